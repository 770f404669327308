"""``python -m maisi.train autoencoder|diffusion|controlnet|mask_autoencoder|mask_diffusion --config FILE
[--resume]``.

The mask stages train the two networks of a mask preset (:mod:`maisi.families.mask`): the mask VAE on the
datalist's label masks, then the size-conditioned mask UNet on their latents (``maisi.encode`` kind "mask").

Also launchable as ``torchrun --nproc_per_node=N -m maisi.train ...``: every process trains on its own
batches, gradients are averaged (DDP), rank 0 alone writes. The run folder holds ``train_config.json``
(the resolved config and its hash), ``state/last.pt`` (resumable), the inference checkpoint(s) that
``maisi.infer`` loads, and ``tensorboard/``. A folder with ``train_config.json`` but no state holds a run
stopped before its first checkpoint: rerunning it (with or without ``--resume``) starts it over.
"""

from __future__ import annotations

import sys

from maisi.cli import EXIT_OK, load_cli_config, make_parser, print_config, run_guarded, setup_cli
from maisi.config.train_config import STAGES

PROG = "maisi.train"


def build_parser():
    parser = make_parser(
        PROG, "Train a MAISI-style autoencoder, diffusion UNet, ControlNet, mask VAE or mask UNet."
    )
    parser.add_argument("stage", choices=STAGES, help="which network to train")
    parser.add_argument("--resume", action="store_true", help="continue the run in output_dir")
    return parser


def _check_files(config) -> None:
    """What needs no network, before the heavy imports: the datalist is there (what it holds is checked
    after the run folder's checks, as before)."""
    from maisi.files import check_files

    check_files({"$.datalist": config.datalist})


def _declared_paths(config):
    from maisi.training.run import declared_paths  # imports torch and MONAI

    return declared_paths(config)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_cli(args)

    def body() -> int:
        # the config and its datalist are checked before torch and MONAI's networks are imported
        config = load_cli_config(args, "train", _declared_paths, check=_check_files)
        from maisi.training.run import prepare, run

        if args.dry_run:
            prepare(args.stage, config, args.resume)  # every check of the run; writes nothing
            return print_config(config)

        run(args.stage, config, args.resume)
        return EXIT_OK

    return run_guarded(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
