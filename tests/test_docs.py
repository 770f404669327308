"""The docs site: generated reference pages up to date with the schemas and parsers, every page in the nav,
every command's page reachable from the README, links that resolve. (``mkdocs build --strict`` in .ci/run
checks the site's own links.)"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "docs" / "reference"


def _load_tool():
    spec = importlib.util.spec_from_file_location(
        "build_reference_docs", REPO / "tools" / "build_reference_docs.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


tool = _load_tool()


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    tool.write_pages(out)
    return out


def _pages(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): p.read_text() for p in sorted(folder.rglob("*.md"))}


def test_reference_pages_are_what_the_schemas_and_parsers_give(regenerated):
    committed, fresh = _pages(REFERENCE), _pages(regenerated)
    assert sorted(committed) == sorted(fresh), "run: python tools/build_reference_docs.py"
    stale = [name for name in fresh if committed[name] != fresh[name]]
    assert not stale, f"stale reference pages {stale}; run: python tools/build_reference_docs.py"


def _schema_keys(node: dict, path: str):
    """(JSON path, node) of every key below a schema node, list items as ``[]``."""
    for key, child in node.get("properties", {}).items():
        yield f"{path}.{key}", child
        yield from _schema_keys(child, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        yield from _schema_keys(node["items"], f"{path}[]")


def test_every_schema_key_is_on_its_page(regenerated):
    """Each key of each schema, at every level, appears with its JSON path, default and description."""
    for schema_file in sorted((REPO / "maisi" / "config" / "schemas").glob("*.schema.json")):
        name = schema_file.name.removesuffix(".schema.json")
        page = (regenerated / "config" / f"{name}.md").read_text()
        rows = {
            line.split(" | ")[0].strip("| `"): line for line in page.splitlines() if line.startswith("| `$")
        }
        schema = json.loads(schema_file.read_text())
        expected = list(_schema_keys(schema, "$"))
        assert expected, name
        for path, node in expected:
            assert path in rows, f"{name}: {path} missing"
            assert tool._cell(node["description"]) in rows[path], f"{name}: {path} lacks its description"
            if "default" in node:
                assert tool._code(node["default"]) in rows[path], f"{name}: {path} lacks its default"


def test_every_command_and_subcommand_option_is_on_its_page(regenerated):
    import argparse

    for script, module_name in tool.cli_modules().items():
        parser = importlib.import_module(module_name).build_parser()
        page = (
            regenerated / "cli" / f"{module_name.removesuffix('.__main__').split('.')[-1]}.md"
        ).read_text()
        assert f"`{script}`" in page
        parsers = {"": parser, **tool._subcommands(parser)}
        for sub_name, sub in parsers.items():
            if sub_name:
                assert f"\n## {sub_name}\n" in page, f"{script}: subcommand {sub_name} missing"
            for action in sub._actions:
                if action.option_strings and not isinstance(action, argparse._HelpAction):
                    assert action.option_strings[-1] in page, f"{script} {sub_name}: {action.option_strings}"


def test_the_check_names_a_stale_a_missing_and_an_extra_page(regenerated, tmp_path):
    out = tmp_path / "reference"
    tool.write_pages(out)
    assert tool.stale_pages(out) == []
    (out / "config" / "infer.md").write_text(
        (out / "config" / "infer.md").read_text().replace("Null", "None")
    )
    (out / "cli" / "train.md").unlink()
    (out / "cli" / "old.md").write_text("# gone\n")
    assert tool.stale_pages(out) == [
        "config/infer.md: differs from its source",
        "cli/train.md: missing",
        "cli/old.md: has no source",
    ]
    assert tool.main(["--check", "--out", str(out)]) == 1
    tool.main(["--out", str(out)])
    assert tool.main(["--check", "--out", str(out)]) == 0 and not (out / "cli" / "old.md").exists()


def test_every_page_is_in_the_site_nav():
    nav = (REPO / "mkdocs.yml").read_text()
    pages = sorted(p.relative_to(REPO / "docs").as_posix() for p in (REPO / "docs").rglob("*.md"))
    missing = [page for page in pages if f" {page}\n" not in nav]
    assert not missing, f"pages not in mkdocs.yml's nav: {missing}"


def _links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return [m for m in re.findall(r"\]\(([^)\s]+)\)", text) if not m.startswith(("http://", "https://", "#"))]


def test_the_readme_is_short_and_its_links_resolve():
    readme = REPO / "README.md"
    assert len(readme.read_text().splitlines()) <= 200
    broken = [link for link in _links(readme) if not (REPO / link.split("#")[0]).exists()]
    assert not broken, broken


def test_a_newcomer_finds_every_command_page_from_the_readme():
    links = set(_links(REPO / "README.md"))
    for module_name in tool.cli_modules().values():
        page = f"docs/reference/cli/{module_name.removesuffix('.__main__').split('.')[-1]}.md"
        assert page in links, f"README does not link {page}"
    assert "docs/reference/index.md" in links
