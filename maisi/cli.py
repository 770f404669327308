"""Pieces every command-line entry point shares: logging set-up and the exit-code contract.

Exit codes: 0 success, 2 bad input (one clear message, no traceback), 1 runtime failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import traceback
from typing import Callable

from maisi.config import load_schema, to_jsonable
from maisi.errors import InputError, RunFailure

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_INPUT = 2


def make_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """Parser with the options every CLI has (``--config``, ``--device``, ``--dry-run``, ``-v``)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)  # exits 2 on bad flags
    parser.add_argument("--config", required=True, help="path to the JSON config file")
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default=None, help="overrides the config's device"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


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


def setup_logging(verbose: bool) -> None:
    """Log ``maisi.*`` messages to stderr; the root logger (an application's or pytest's) is left alone."""
    logger = logging.getLogger("maisi")
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not any(getattr(h, "_maisi_cli", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        handler._maisi_cli = True  # type: ignore[attr-defined]
        logger.addHandler(handler)


def run_guarded(prog: str, body: Callable[[], int]) -> int:
    """Run ``body`` and map exceptions onto the exit-code contract."""
    try:
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
    except Exception:  # noqa: BLE001 - the contract is "1 on any runtime failure", with the details
        traceback.print_exc()
        print(f"{prog}: runtime failure (see the traceback above)", file=sys.stderr)
        return EXIT_RUNTIME


def load_cli_config(args: argparse.Namespace, kind: str):
    """The config named by ``--config``, with ``--device`` applied when given."""
    from maisi.preset_checks import load_checked_config

    config = load_checked_config(args.config, kind)
    return dataclasses.replace(config, device=args.device) if args.device else config


def print_config(config) -> int:
    """``--dry-run``: the resolved config as JSON on stdout."""
    print(json.dumps(to_jsonable(config), indent=2))
    return EXIT_OK
