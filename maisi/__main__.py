"""``python -m maisi`` lists every command with its subcommands, read from the commands' own parsers."""

from __future__ import annotations

import argparse
import importlib

# Every command-line entry point: ``python -m <module>``, each a ``main(argv)`` with a ``build_parser()``.
CLI_MODULES = (
    "maisi.infer",
    "maisi.labels",
    "maisi.masks",
    "maisi.datalist",
    "maisi.encode",
    "maisi.train",
    "maisi.evaluate",
    "maisi.download",
    "maisi.config",
)


def cli_module(name: str):
    """The module that holds ``main``/``build_parser`` of ``python -m name`` (a package's ``__main__``)."""
    module = importlib.import_module(name)
    return module if hasattr(module, "build_parser") else importlib.import_module(f"{name}.__main__")


def synopsis(parser: argparse.ArgumentParser) -> str:
    """Subcommands or positional choices, then the required options: ``train STAGE --config FILE``."""
    words = []
    for action in parser._actions:
        if not action.option_strings and action.choices:  # subcommands, or a positional with choices
            words.append("|".join(action.choices))
        elif action.option_strings and action.required:
            words.append(f"{action.option_strings[0]} {action.dest.upper()}")
    return " ".join(words)


def listing() -> str:
    lines = ["maisi commands (each has --help):"]
    for name in CLI_MODULES:
        parser = cli_module(name).build_parser()
        lines.append(f"  python -m {name} {synopsis(parser)}")
        lines.append(f"      {parser.description}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(listing())
