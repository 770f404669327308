"""Pieces every command-line entry point shares: parsers, logging, progress bars and the exit-code contract.

Every CLI is ``main(argv) -> int``: it parses (importing nothing heavy, so ``--help`` is instant), loads and
checks its inputs, then calls the library. Every CLI has ``-v/--verbose`` and ``--no-progress``, and every
option has help text with its default. Exit codes: 0 success, 2 bad input (one clear message, no traceback), 1
runtime failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import re
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tqdm.contrib.logging import logging_redirect_tqdm

from maisi.config import load_schema, to_jsonable
from maisi.errors import InputError, RunFailure
from maisi.files import SYMLINK_LOOP
from maisi.options import DEVICE_NAMES
from maisi.progress import set_enabled as set_progress
from maisi.run_paths import RunPaths

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_INPUT = 2


class HelpFormatter(argparse.HelpFormatter):
    """Help that shows each option's default, unless the help text already says it or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        quiet = action.default in (None, False, argparse.SUPPRESS) or not action.option_strings
        return text if quiet or "default" in text else f"{text} (default: %(default)s)"


def _common_options(suppress: bool) -> argparse.ArgumentParser:
    """``-v`` and ``--no-progress``; on subcommands their defaults are suppressed so that they do not undo
    the same flag given before the subcommand."""
    common = argparse.ArgumentParser(add_help=False)
    extra = {"default": argparse.SUPPRESS} if suppress else {}
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging", **extra)
    common.add_argument("--no-progress", action="store_true", help="no progress bars", **extra)
    return common


def new_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A parser with the options every CLI has (``-v``, ``--no-progress``); bad flags exit 2."""
    return argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=HelpFormatter, parents=[_common_options(False)]
    )


def add_subcommand(subparsers: Any, name: str, help: str) -> argparse.ArgumentParser:
    """A subcommand (``python -m maisi.labels add``) with the common options and the same help style."""
    return subparsers.add_parser(
        name, help=help, description=help, formatter_class=HelpFormatter, parents=[_common_options(True)]
    )


def make_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """Parser of a config-driven CLI: the common options plus ``--config``, ``--device`` and ``--dry-run``."""
    parser = new_parser(prog, description)
    parser.add_argument("--config", required=True, help="path to the JSON config file")
    parser.add_argument(
        "--device",
        choices=DEVICE_NAMES,
        default=None,
        help="overrides the config's device (default: the config's)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="check everything, print the resolved config, exit"
    )
    parser.add_argument(
        "--threads",
        type=_threads_flag,
        default=None,
        help="torch threads per process: 'auto' or a number; overrides $.threads (default: the config's)",
    )
    return parser


def _threads_flag(text: str) -> str | int:
    """argparse ``type`` of ``--threads``: a bad value is a usage error (exit 2) naming what is expected."""
    from maisi.threads import parse_setting

    try:
        return parse_setting(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def setup_cli(args: argparse.Namespace) -> None:
    """Apply the common options: log level and progress bars."""
    setup_logging(getattr(args, "verbose", False))
    set_progress(not getattr(args, "no_progress", False))


def schema_int(kind: str, key: str) -> Callable[[str], int]:
    """An argparse ``type`` for a flag that overrides the integer ``$.<key>`` of a ``kind`` config.

    The flag is held to the bounds the schema gives the key, so a command line cannot pass what the
    config file could not; a value outside them is a usage error (exit 2) naming the flag and the bounds.
    """
    spec = load_schema(kind)["properties"][key]
    low, high = spec.get("minimum"), spec.get("maximum")

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is outside [{low}, {high}], the bounds of $.{key}")
        return value

    return parse


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted, not to the one of the first CLI call
    (pytest, notebooks and callers of ``main`` swap it; the old one may be closed by then)."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(verbose: bool) -> None:
    """Log ``maisi.*`` messages to stderr; the root logger (an application's or pytest's) is left alone."""
    logger = logging.getLogger("maisi")
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not any(getattr(h, "_maisi_cli", False) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        handler._maisi_cli = True  # type: ignore[attr-defined]
        logger.addHandler(handler)


@dataclass(frozen=True)
class Command:
    """A subcommand as the scaffolding runs it: ``paths(args)`` declares every file and folder it reads and
    writes (:class:`maisi.run_paths.RunPaths`), checked before ``run(args)`` does any work."""

    run: Callable[[Any], int]
    paths: Callable[[Any], RunPaths]


def writes_nothing(args: Any) -> RunPaths:
    """The declaration of a subcommand that only reads and prints."""
    return RunPaths()


def run_command(prog: str, command: Command, args: argparse.Namespace) -> int:
    """Check what ``command`` declares it reads and writes, then run it; exit codes as :func:`run_guarded`."""
    if not isinstance(command, Command) or not callable(command.paths):
        raise TypeError(f"{prog}: a command must be a cli.Command with its paths declaration")

    def body() -> int:
        command.paths(args).check(f"run {prog}")
        return command.run(args)

    return run_guarded(prog, body)


def run_subcommand(
    prog: str,
    parser: argparse.ArgumentParser,
    commands: dict[str, Command],
    argv: list[str] | None,
) -> int:
    """``main`` of a CLI with subcommands: parse, apply the common options, check the chosen command's
    declared paths (:class:`Command`), run it guarded."""
    args = parser.parse_args(argv)
    setup_cli(args)
    return run_command(prog, commands[args.command], args)


def run_guarded(prog: str, body: Callable[[], int]) -> int:
    """Run ``body`` and map exceptions onto the exit-code contract."""
    try:
        with logging_redirect_tqdm(
            loggers=[logging.getLogger("maisi")]
        ):  # log lines above the bars, not in them
            return body()
    except InputError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return EXIT_INPUT
    except RunFailure as err:
        print(f"{prog}: failed: {err}", file=sys.stderr)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_RUNTIME
    except (RuntimeError, OSError) as err:
        loop = _symlink_loop(err)
        if loop is None:
            traceback.print_exc()
            print(f"{prog}: runtime failure (see the traceback above)", file=sys.stderr)
            return EXIT_RUNTIME
        print(f"{prog}: error: {loop} {SYMLINK_LOOP}", file=sys.stderr)
        return EXIT_INPUT
    except Exception:  # noqa: BLE001 - the contract is "1 on any runtime failure", with the details
        traceback.print_exc()
        print(f"{prog}: runtime failure (see the traceback above)", file=sys.stderr)
        return EXIT_RUNTIME


def _symlink_loop(err: RuntimeError | OSError) -> str | None:
    """The path of a symlink loop met anywhere in a command (Path.resolve raises RuntimeError for one on
    Python < 3.13, OSError ELOOP since; open and stat raise OSError ELOOP), else None."""
    if isinstance(err, OSError):
        return err.filename if err.errno == errno.ELOOP and err.filename else None
    match = re.fullmatch(r"Symlink loop from '(.*)'", str(err))
    return match.group(1) if match else None


def load_cli_config(
    args: argparse.Namespace,
    kind: str,
    paths: Callable[[Any], RunPaths],
    adjust: Callable[[Any, argparse.Namespace], Any] | None = None,
    check: Callable[[Any], None] | None = None,
):
    """The config named by ``--config``, with ``--device`` and ``--threads`` (or ``adjust(config, args)``:
    the command's own flags) applied, once ``check(config)`` (the command's checks of its files that need no
    network) and the guard of :mod:`maisi.run_paths` over what it declares it reads and writes
    (``paths(config)``) passed; then the torch threads are chosen and applied
    (:func:`maisi.threads.apply_threads`), the one place every CLI does so.

    ``check`` must not import torch or MONAI: a missing input is reported within a second of the start,
    not after the heavy imports (a test asserts it for every CLI).
    """
    from maisi.families.checks import load_checked_config
    from maisi.threads import apply_threads

    config = load_checked_config(args.config, kind)
    if adjust is not None:
        config = adjust(config, args)
    elif args.device:
        config = dataclasses.replace(config, device=args.device)
    if getattr(args, "threads", None) is not None:
        config = dataclasses.replace(config, threads=args.threads)
    if check is not None:
        check(config)
    paths(config).check({"infer": "generate"}.get(kind, kind))
    choice = apply_threads(config.threads)
    logging.getLogger("maisi").debug("torch threads: %s", choice.reason)
    return config


def print_config(config) -> int:
    """``--dry-run``: the resolved config as JSON on stdout."""
    print(json.dumps(to_jsonable(config), indent=2))
    return EXIT_OK
