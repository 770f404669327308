"""``python -m maisi.encode --config FILE``: pre-encode a datalist's CT images into VAE latents.

Writes ``<name>_emb.nii.gz`` + ``<name>_emb.nii.gz.json`` per case (and ``<name>_label.nii.gz`` on the
latent's image grid when the case has a label), then a datalist of the latents for training. Restartable:
finished, intact cases are skipped. With ``torchrun --nproc_per_node=N -m maisi.encode ...`` every rank
encodes its share and rank 0 writes the datalist. Exit codes: 0 all encoded, 1 some case failed (the others
are still done), 2 bad input: checked before the model loads and before anything is written, including
output locations and any output that would land on an input of the run or on another case's output.
"""

from __future__ import annotations

import sys

from maisi.cli import (
    EXIT_OK,
    EXIT_RUNTIME,
    load_cli_config,
    make_parser,
    print_config,
    run_guarded,
    setup_cli,
)

PROG = "maisi.encode"


def build_parser():
    parser = make_parser(PROG, "Pre-encode CT images into VAE latents for training.")
    parser.add_argument(
        "--max-cases",
        type=int,
        default=None,
        help="encode at most this many cases (per rank) in this run; a rerun continues (default: all)",
    )
    return parser


def _check_files(config) -> None:
    """What needs no network, before the heavy imports: the datalist and the VAE are there, the datalist
    reads."""
    from maisi.data.datalist import read_datalist
    from maisi.files import check_files

    check_files({"$.datalist": config.datalist, "$.autoencoder": config.autoencoder})
    read_datalist(config.datalist)


def _declared_paths(config):
    from maisi.encoding.run import declared_paths  # imports torch and MONAI

    return declared_paths(config)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_cli(args)

    def body() -> int:
        # the config and its datalist are checked before torch and MONAI's networks are imported
        config = load_cli_config(args, "encode", _declared_paths, check=_check_files)
        from maisi.encoding.run import prepare, run

        if args.dry_run:
            prepare(config)  # every check of the run, the VAE loaded strictly; writes nothing
            return print_config(config)

        results = run(config, args.max_cases)
        return EXIT_RUNTIME if any(r.status == "failed" for r in results) else EXIT_OK

    return run_guarded(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
