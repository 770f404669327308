"""``maisi.monai_internals`` is the only module of ``maisi/`` that imports MONAI names outside MONAI's public
API, and every name it holds still exists in the installed MONAI."""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterator
from pathlib import Path

import pytest

import maisi
from maisi import monai_internals

PACKAGE = Path(maisi.__file__).parent
HOME = PACKAGE / "monai_internals.py"
# The MAISI networks MONAI documents by their module path (its MAISI tutorials import them so); the package
# ``monai.apps.generation.maisi.networks`` exports nothing, so the rule below would call them private.
DOCUMENTED = {
    ("monai.apps.generation.maisi.networks.autoencoderkl_maisi", "AutoencoderKlMaisi"),
    ("monai.apps.generation.maisi.networks.controlnet_maisi", "ControlNetMaisi"),
    ("monai.apps.generation.maisi.networks.diffusion_model_unet_maisi", "DiffusionModelUNetMaisi"),
}


def is_private(module: str, name: str) -> bool:
    """Whether ``from module import name`` reaches past MONAI's public API.

    Private: any part of the path or the name starts with ``_``, or no MONAI package on the way to the
    module (the module itself when it is a package, else its enclosing packages below ``monai``) exports the
    name. ``monai.transforms.utils_morphological_ops.dilate`` is public (``monai.transforms`` exports it);
    ``monai.losses.perceptual.normalize_tensor`` is not.
    """
    if (module, name) in DOCUMENTED:
        return False
    if any(part.startswith("_") for part in [*module.split("."), name]):
        return True
    parts = module.split(".")
    for depth in range(len(parts), 1, -1):
        package = importlib.import_module(".".join(parts[:depth]))
        if hasattr(package, "__path__") and name in vars(package):
            return False
    return True


def monai_imports(tree: ast.AST) -> Iterator[tuple[int, str, str]]:
    """``(line, module, name)`` of every import of a MONAI name, at any depth (function-level ones too)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "monai" or node.module.startswith("monai."):
                yield from ((node.lineno, node.module, alias.name) for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("monai."):
                    module, _, name = alias.name.rpartition(".")
                    yield node.lineno, module, name


def test_the_rule_tells_public_from_private():
    assert not is_private("monai.transforms", "RandZoom")
    assert not is_private("monai.transforms.utils_morphological_ops", "dilate")  # monai.transforms has it
    assert not is_private("monai.networks.nets.resnet", "ResNetFeatures")
    assert not is_private("monai.apps.generation.maisi.networks.autoencoderkl_maisi", "AutoencoderKlMaisi")
    assert is_private("monai.apps.generation.maisi.networks.autoencoderkl_maisi", "MaisiResBlock")
    assert is_private("monai.losses.perceptual", "normalize_tensor")
    assert is_private("monai.transforms.utils", "_create_rotate")


def test_private_monai_names_are_imported_only_by_monai_internals():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == HOME:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for line, module, name in monai_imports(tree):
            if is_private(module, name):
                where = path.relative_to(PACKAGE.parent)
                offenders.append(f"{where}:{line}: from {module} import {name}")
    assert not offenders, "import these from maisi.monai_internals instead:\n" + "\n".join(offenders)


def test_monai_internals_holds_only_private_names_that_exist():
    imported = {name: module for _, module, name in monai_imports(ast.parse(HOME.read_text()))}
    for name in monai_internals.__all__:
        assert hasattr(monai_internals, name), name
        if name in imported:
            module = importlib.import_module(imported[name])
            assert hasattr(module, name), f"{imported[name]}.{name} is gone from MONAI"
            assert is_private(imported[name], name), f"{name} is public: import it from MONAI directly"
    private = [name for name, module in imported.items() if is_private(module, name)]
    assert sorted(private) == sorted(n for n in monai_internals.__all__ if n in imported)


def test_rand_zoom_factors_are_the_zoom_drawn():
    import torch
    from monai.transforms import RandZoom

    zoom = RandZoom(min_zoom=0.5, max_zoom=0.5, prob=1.0, keep_size=False)
    out = zoom(torch.zeros(1, 8, 8, 8))
    assert monai_internals.rand_zoom_factors(zoom) == [0.5, 0.5, 0.5]
    assert tuple(out.shape[1:]) == (4, 4, 4)


@pytest.mark.parametrize("name", ["MaisiResBlock", "MaisiDecoder", "normalize_tensor"])
def test_the_adapter_and_the_losses_use_the_names_held_here(name):
    users = {
        "MaisiResBlock": "maisi.vae.monai_adapter",
        "MaisiDecoder": "maisi.vae.monai_adapter",
        "normalize_tensor": "maisi.training.perceptual",
    }
    assert getattr(importlib.import_module(users[name]), name) is getattr(monai_internals, name)
