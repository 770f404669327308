"""``python -m maisi.config``: translate MAISI inference configs, validate ours.

    python -m maisi.config import-maisi FILE --output OURS.json [--environment ENV.json] [--preset P]
        [--maisi-root DIR] [--data-root DIR] [--weights-dir DIR]
    python -m maisi.config validate FILE --kind infer|encode|train|evaluate

``import-maisi`` writes the translated config (atomically, only once it passes our loader) and lists
what became of every MAISI key: translated and not needed on stdout, NOT translated on stderr (exit 0
all the same).
Exit 2: the input is not a MAISI inference config (not JSON, not an object, ours, none of MAISI's keys, an
output_size or spacing that is code), a modality that does not fit the model (or an MR one whose model
nothing names), unknown region or anatomy names, a translation that our
loader refuses (each problem with the MAISI key it came from), or an ``--output`` that cannot be written or
would overwrite an input. ``validate`` runs the loader and the preset checks every CLI runs on its config.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from maisi.atomic import write_json
from maisi.cli import EXIT_OK, Command, add_subcommand, new_parser, run_command, setup_cli, writes_nothing
from maisi.config.import_maisi import PATH_KEYS, PRESETS, Places, Translation, translate
from maisi.config.registry import KINDS
from maisi.config.schema import load_schema, schema_errors
from maisi.errors import ConfigError, InputError
from maisi.files import output_folder_problem
from maisi.run_paths import RunPaths

PROG = "maisi.config"


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser(PROG, "Translate MAISI inference configs into ours; validate configs.")
    sub = parser.add_subparsers(dest="command", required=True)
    imp = add_subcommand(
        sub,
        "import-maisi",
        "translate a MAISI config_infer.json (or the bundle's inference.json) into a maisi.infer config; "
        "every key that cannot be translated is named on stderr",
    )
    imp.add_argument("file", help="MAISI config_infer*.json, or the bundle's configs/inference.json")
    imp.add_argument("--output", required=True, help="the maisi.infer config to write")
    imp.add_argument(
        "--environment",
        help="MAISI environment_*.json: weights, mask database, output folder",
    )
    imp.add_argument(
        "--preset",
        choices=PRESETS,
        help="the model (default: from the weights' names, else maisi-ct-rflow)",
    )
    imp.add_argument(
        "--maisi-root",
        default=".",
        help="the folder MAISI ran in (its paths start there)",
    )
    imp.add_argument(
        "--data-root",
        help="where MAISI put paths holding 'datasets/' (default: $MONAI_DATA_DIRECTORY, else --maisi-root)",
    )
    imp.add_argument(
        "--weights-dir",
        default="models/maisi",
        help="maisi.download's --dest, for the files the MAISI config does not name",
    )
    val = add_subcommand(
        sub,
        "validate",
        "check a config as the CLIs do (schema, cross-key, preset checks)",
    )
    val.add_argument("file", help="the config")
    val.add_argument(
        "--kind",
        required=True,
        choices=sorted(KINDS),
        help="which command the config is for",
    )
    return parser


# ---------------------------------------------------------------- import-maisi


def _check_output(output: Path) -> None:
    """Refuse an --output in a folder that cannot be written (collisions: :func:`paths_import`)."""
    problem = output_folder_problem(output.parent, "--output folder")
    if problem:
        raise InputError(problem)


def _problems_with_sources(errors: list[str], t: Translation) -> list[str]:
    """The loader's ``$.path: message`` lines, each with the MAISI key it came from."""
    lines = []
    for line in errors:
        source = t.source_of(line.split(":", 1)[0].split(" ", 1)[0])
        lines.append(f"{line} (from MAISI's {source})" if source else line)
    return lines


def absolute_paths(t: Translation, folder: Path) -> dict:
    """The config with its relative paths made absolute against ``folder``, to be checked from elsewhere."""
    config = json.loads(json.dumps(t.config))
    for *parents, key in PATH_KEYS:
        node = config
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(key), str):
            node[key] = str(folder / node[key])
    return config


def check_translation(t: Translation, output: Path) -> list[str]:
    """Validate the translated config with the loader and the preset checks; returns notes.

    While the infer schema has no ``anatomy`` key (the anatomy mode lands separately), the rest of the
    config is checked against the schema only: the cross-key checks would judge it as an image-only config.

    Raises:
        InputError: every problem, each with the MAISI key it came from.
    """
    from maisi.families.checks import load_checked_config

    if "anatomy" not in load_schema("infer")["properties"]:
        rest = {k: v for k, v in t.config.items() if k != "anatomy"}
        errors = schema_errors(rest, load_schema("infer"))
        if errors:
            raise ConfigError(str(output), _problems_with_sources(errors, t))
        return ["$.anatomy was not validated: this version's infer schema has no 'anatomy' key yet"]
    with tempfile.TemporaryDirectory(prefix="maisi-import-") as tmp:
        path = Path(tmp) / output.name  # nothing in the output folder until the config is valid
        path.write_text(json.dumps(absolute_paths(t, output.parent.resolve())))
        try:
            load_checked_config(path, "infer")
        except ConfigError as err:
            raise ConfigError(str(output), _problems_with_sources(err.errors, t)) from None
    return []


def _report(t: Translation, source: Path, output: Path, notes: list[str]) -> None:
    print(f"{source} -> {output} (preset {t.config['preset']})")
    print(f"translated ({len(t.translated)}):")
    for key, ours, value in t.translated:
        print(f"  {key} -> {ours} = {json.dumps(value)}")
    print(f"not needed ({len(t.not_needed)}):")
    for key, why in t.not_needed:
        print(f"  {key}: {why}")
    for note in [*t.notes, *notes]:
        print(f"note: {note}")
    for key, why in t.untranslated:
        print(f"{PROG} import-maisi: NOT translated: {key}: {why}", file=sys.stderr)
    if t.untranslated:
        keys = ", ".join(key for key, _ in t.untranslated)
        print(
            f"{PROG} import-maisi: {len(t.untranslated)} key(s) NOT translated ({keys})",
            file=sys.stderr,
        )


def run_import(args: argparse.Namespace) -> int:
    source, output = Path(args.file), Path(args.output)
    environment = Path(args.environment) if args.environment else None
    _check_output(output)
    maisi_root = Path(args.maisi_root).expanduser().resolve()
    data_root = args.data_root or os.environ.get("MONAI_DATA_DIRECTORY") or maisi_root
    places = Places(
        maisi_root=maisi_root,
        data_root=Path(data_root).expanduser().resolve(),
        weights_dir=Path(args.weights_dir).expanduser().resolve(),
        output_dir=output.parent.resolve(),
    )
    translation = translate(source, places, environment=environment, preset=args.preset)
    notes = check_translation(translation, output)
    write_json(output, translation.config)
    _report(translation, source, output, notes)
    return EXIT_OK


# ---------------------------------------------------------------- validate


def run_validate(args: argparse.Namespace) -> int:
    from maisi.families.checks import load_checked_config

    load_checked_config(args.file, args.kind)
    print(f"{args.file}: a valid {args.kind} config")
    return EXIT_OK


def paths_import(args: argparse.Namespace) -> RunPaths:
    paths = RunPaths().read("FILE", args.file).read("--environment", args.environment)
    return paths.write("--output", args.output)


COMMANDS = {
    "import-maisi": Command(run_import, paths_import),
    "validate": Command(run_validate, writes_nothing),
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_cli(args)
    return run_command(f"{PROG} {args.command}", COMMANDS[args.command], args)


if __name__ == "__main__":
    sys.exit(main())
