"""One CLI pattern: every command's parser, its help, its imports, and the ``python -m maisi`` listing."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from maisi.__main__ import CLI_MODULES, cli_module, listing
from maisi.progress import progress_bar, set_enabled

REPO = Path(__file__).resolve().parents[1]


def _parsers(parser: argparse.ArgumentParser, name: str):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


@pytest.mark.parametrize("module", CLI_MODULES)
def test_every_option_has_help_and_the_common_options(module):
    parser = cli_module(module).build_parser()
    missing = []
    for name, p in _parsers(parser, module):
        options = {s for a in p._actions for s in a.option_strings}
        assert {"-v", "--verbose", "--no-progress"} <= options, f"{name} lacks the common options"
        for action in p._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            if not action.help:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
        p.format_help()  # every help string formats (a stray % would raise here)
    assert not missing, "options without help: " + ", ".join(missing)


def test_defaults_are_shown_in_the_help():
    from maisi.download import build_parser

    assert "(default: models/maisi)" in build_parser().format_help()


def test_common_options_work_before_and_after_a_subcommand():
    parser = cli_module("maisi.labels").build_parser()
    assert parser.parse_args(["-v", "show"]).verbose is True
    assert parser.parse_args(["show", "-v"]).verbose is True
    assert parser.parse_args(["show"]).verbose is False


def test_cli_modules_import_neither_torch_nor_monai():
    """What keeps every ``--help`` fast: parsing needs neither torch nor MONAI."""
    code = (
        "import sys\n"
        "from maisi.__main__ import CLI_MODULES, cli_module\n"
        "for name in CLI_MODULES:\n"
        "    cli_module(name).build_parser()\n"
        "heavy = sorted(m for m in ('torch', 'monai') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert done.stdout.strip() == ""


def test_listing_names_every_command_and_subcommand_and_the_console_scripts_match():
    text = listing()
    for name in CLI_MODULES:
        assert f"python -m {name} " in text
    assert "add|remap|envelope|crop|resample|show" in text and "index|show|query" in text
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    targets = {target.split(":")[0].removesuffix(".__main__") for target in scripts.values()}
    assert targets == set(CLI_MODULES)
    done = subprocess.run([sys.executable, "-m", "maisi"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0 and done.stdout.strip() == text


def test_no_progress_switches_every_bar_off():
    try:
        set_enabled(False)
        assert progress_bar(range(3)).disable
    finally:
        set_enabled(True)
    assert not progress_bar(range(3)).disable
    assert progress_bar(range(3), enabled=False).disable  # e.g. ranks other than 0
