"""Every console script and subcommand that writes, with an output pointed at each of its inputs: as written,
through a symlink, through a hard link, and (where it writes a folder of its own) the input's folder. Each
must exit 2 naming both paths and leave every input byte-identical. The commands come from pyproject's
``[project.scripts]`` and each parser's subcommands: a new command without a case here fails the walk."""

from __future__ import annotations

import argparse
import hashlib
import importlib
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tomllib

from maisi.data.io import Volume, write_volume
from tests.conftest import phantom_mask, write_config

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def commands() -> list[tuple[str, str | None]]:
    """(console script, subcommand or None) of every command the package installs."""
    found = []
    for script, target in sorted(SCRIPTS.items()):
        module = importlib.import_module(target.split(":")[0])
        parser = module.build_parser()
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        names = sorted(subs[0].choices) if subs else [None]
        found += [(script, name) for name in names]
    return found


READ_ONLY = {
    ("maisi-config", "validate"),
    ("maisi-datalist", "validate"),
    ("maisi-labels", "show"),
    ("maisi-masks", "query"),
    ("maisi-masks", "show"),
}


@dataclass
class Case:
    """A writing command: ``argv(name, path)`` writes its output ``name`` at ``path`` (the others at harmless
    places); ``pairs`` are (output, input key) to point at each other; a "folder" output is a folder it writes
    its own files into."""

    script: str
    argv: Callable[[str, Path], list[str]]
    inputs: dict[str, Path]
    outputs: dict[str, str]
    pairs: list[tuple[str, str]] = field(default_factory=list)

    def all_pairs(self) -> list[tuple[str, str]]:
        return self.pairs or [(out, key) for out in self.outputs for key in self.inputs]


def workspace(ws: Path, checkpoints: dict[str, Path]) -> dict[str, Path]:
    """The inputs every case draws on, written once per test."""
    from maisi.labels import label_dict_json, load_label_dict

    files = {
        "mask": write_volume(ws / "in" / "mask.nii.gz", Volume(phantom_mask(), np.eye(4))),
        "ct": write_volume(ws / "in" / "ct.nii.gz", Volume(np.zeros((32, 32, 16), np.float32), np.eye(4))),
        "label_dict": write_config(ws / "in" / "labels.json", label_dict_json(load_label_dict())),
        "mapping": write_config(ws / "in" / "map.json", {"1": "liver"}),
        "reference": write_config(ws / "in" / "ref.json", {}),
        "maisi": write_config(ws / "in" / "config_infer.json", {"num_output_samples": 1}),
        "environment": write_config(ws / "in" / "environment.json", {"output_dir": "output"}),
    }
    for case in ("a", "b"):
        files[f"ct_{case}"] = write_volume(
            ws / "cases" / case / "ct.nii.gz", Volume(np.zeros((32, 32, 16)), np.eye(4))
        )
        files[f"label_{case}"] = write_volume(
            ws / "cases" / case / "label.nii.gz", Volume(phantom_mask(), np.eye(4))
        )
    entries = [{"image": f"{c}/ct.nii.gz", "label": f"{c}/label.nii.gz"} for c in "ab"]
    files["datalist"] = write_config(ws / "cases" / "dl.json", {"training": entries})
    weights = ws / "weights"
    weights.mkdir()
    for part, path in checkpoints.items():
        files[part] = Path(shutil.copy(path, weights / f"{part}.pt"))
    # named like the outputs of an infer job with prefix "s", so that an output can be pointed at each
    names = {
        "mask": "s_seed0_label.nii.gz",
        "controlnet": "s_seed0_preview.png",
        "autoencoder": "s_seed0_image.nii.gz",
    }
    (ws / "infer").mkdir()
    for key, name in names.items():
        files[f"infer_{key}"] = Path(shutil.copy(files[key], ws / "infer" / name))
    return files


def cases(ws: Path, f: dict[str, Path]) -> dict[tuple[str, str | None], list[Case]]:
    """Every writing command and how to point its outputs at its inputs."""
    p = str

    add = Case(
        "maisi-labels",
        lambda n, t: ["add", "--name", "thing", "--label-dict", p(f["label_dict"]), "--output", p(t)],
        {"--label-dict": f["label_dict"]},
        {"--output": "file"},
    )
    remap = Case(
        "maisi-labels",
        lambda n, t: ["remap", "--mask", p(f["mask"]), "--mapping", p(f["mapping"]), "--output", p(t)],
        {"--mask": f["mask"], "--mapping": f["mapping"]},
        {"--output": "file"},
    )
    envelope = Case(
        "maisi-labels",
        lambda n, t: ["envelope", "--image", p(f["ct"]), "--mask", p(f["mask"]), "--output", p(t)],
        {"--image": f["ct"], "--mask": f["mask"]},
        {"--output": "file"},
    )

    def crop_argv(n: str, t: Path) -> list[str]:
        outs = {"--output-image": ws / "c.nii.gz", "--output-mask": ws / "m.nii.gz", n: t}
        args = [
            "crop",
            "--image",
            p(f["ct"]),
            "--mask",
            p(f["mask"]),
            "--around",
            "1",
            "--size-mm",
            "8",
            "8",
            "8",
        ]
        return args + [x for k, v in outs.items() for x in (k, p(v))]

    crop = Case(
        "maisi-labels",
        crop_argv,
        {"--image": f["ct"], "--mask": f["mask"]},
        {"--output-image": "file", "--output-mask": "file"},
    )
    resample = Case(
        "maisi-labels",
        lambda n, t: ["resample", "--mask", p(f["mask"]), "--size", "8", "8", "8", "--output", p(t)],
        {"--mask": f["mask"]},
        {"--output": "file"},
    )
    build = Case(
        "maisi-datalist",
        lambda n, t: (
            ["build", "--root", p(ws / "cases"), "--images", "*/ct.nii.gz", "--labels", "*/label.nii.gz"]
            + ["--output", p(t)]
        ),
        {"--images": f["ct_a"], "--labels": f["label_b"]},
        {"--output": "file"},
    )
    index = Case(
        "maisi-masks",
        lambda n, t: ["index", "--masks", p(ws / "cases"), "--output", p(t)],
        {"--masks": f["label_a"]},
        {"--output": "file"},
    )
    volumes = {"$.training[0].image": f["ct_a"], "$.training[1].label": f["label_b"]}

    def sizes_argv(n: str, t: Path) -> list[str]:
        outs = {"--output": ws / "o.json", n: t}
        if "--build-reference" not in outs:
            outs["--reference"] = f["reference"]
        return ["sizes", "--datalist", p(f["datalist"])] + [x for k, v in outs.items() for x in (k, p(v))]

    sizes = Case(
        "maisi-masks",
        sizes_argv,
        {"--datalist": f["datalist"], "--reference": f["reference"], **volumes},
        {"--output": "file"},
    )
    sizes_build = Case(
        "maisi-masks",
        lambda n, t: (
            ["sizes", "--datalist", p(f["datalist"]), "--output", p(ws / "o.json")]
            + ["--build-reference", p(t)]
        ),
        {"--datalist": f["datalist"], **volumes},
        {"--build-reference": "file"},
    )
    import_maisi = Case(
        "maisi-config",
        lambda n, t: ["import-maisi", p(f["maisi"]), "--environment", p(f["environment"]), "--output", p(t)],
        {"FILE": f["maisi"], "--environment": f["environment"]},
        {"--output": "file"},
    )
    download = Case(
        "maisi-download", lambda n, t: ["--variant", "ct", "--dest", p(t)], {}, {"--dest": "folder"}
    )

    def config_argv(kind: str, data: dict, *extra: str) -> list[str]:
        return [*extra, "--config", p(write_config(ws / "configs" / f"{kind}.json", data))]

    infer_inputs = {
        "$.mask": f["infer_mask"],
        "$.checkpoints.controlnet": f["infer_controlnet"],
        "$.checkpoints.autoencoder": f["infer_autoencoder"],
    }
    infer = Case(
        "maisi-infer",
        lambda n, t: config_argv(
            "infer",
            {
                "preset": "tiny-rflow",
                "checkpoints": {
                    "autoencoder": p(f["infer_autoencoder"]),
                    "diffusion_unet": p(f["diffusion_unet"]),
                    "controlnet": p(f["infer_controlnet"]),
                },
                "mask": p(f["infer_mask"]),
                "output": {"dir": p(t.parent), "prefix": "s", "preview": True},
                "device": "cpu",
            },
        ),
        infer_inputs,
        {"a sample's file": "file"},
    )
    encode_inputs = {
        "the input datalist": f["datalist"],
        "the autoencoder checkpoint": f["autoencoder"],
        "the image of $.training[0]": f["ct_a"],
        "the label of $.training[1]": f["label_b"],
    }
    encode = Case(
        "maisi-encode",
        lambda n, t: config_argv(
            "encode",
            {
                "preset": "tiny-rflow",
                "autoencoder": p(f["autoencoder"]),
                "datalist": p(f["datalist"]),
                "output_dir": p(ws / "emb"),
                "output_datalist": p(t),
                "device": "cpu",
            },
        ),
        encode_inputs,
        {"$.output_datalist": "file"},
    )
    train = Case(
        "maisi-train",
        lambda n, t: config_argv(
            "train",
            {
                "preset": "tiny-rflow",
                "datalist": p(f["datalist"]),
                "output_dir": p(t),
                "init": {"autoencoder": p(f["autoencoder"])},
                "steps": 1,
                "device": "cpu",
            },
            "autoencoder",
        ),
        {
            "$.datalist": f["datalist"],
            "$.init.autoencoder": f["autoencoder"],
            "$.training[1].label": f["label_b"],
        },
        {"$.output_dir": "owned"},
    )

    def evaluate_argv(n: str, t: Path) -> list[str]:
        outputs = {"report": p(ws / "r.json"), "montage": p(ws / "m.png"), n.split(".")[-1]: p(t)}
        data = {
            "real_datalist": p(f["datalist"]),
            "synthetic": [p(f["ct_a"]), p(f["ct_b"])],
            "reconstruction": {"enabled": True, "preset": "tiny-rflow", "autoencoder": p(f["autoencoder"])},
            "output": outputs,
            "device": "cpu",
        }
        return config_argv("evaluate", data)

    evaluate = Case(
        "maisi-evaluate",
        evaluate_argv,
        {
            "$.real_datalist": f["datalist"],
            "$.reconstruction.autoencoder": f["autoencoder"],
            "a volume of $.synthetic": f["ct_b"],
        },
        {"$.output.report": "file", "$.output.montage": "file"},
    )
    return {
        ("maisi-labels", "add"): [add],
        ("maisi-labels", "remap"): [remap],
        ("maisi-labels", "envelope"): [envelope],
        ("maisi-labels", "crop"): [crop],
        ("maisi-labels", "resample"): [resample],
        ("maisi-datalist", "build"): [build],
        ("maisi-masks", "index"): [index],
        ("maisi-masks", "sizes"): [sizes, sizes_build],
        ("maisi-config", "import-maisi"): [import_maisi],
        ("maisi-download", None): [download],
        ("maisi-infer", None): [infer],
        ("maisi-encode", None): [encode],
        ("maisi-train", None): [train],
        ("maisi-evaluate", None): [evaluate],
    }


def _main(script: str) -> Callable[[list[str]], int]:
    module, name = SCRIPTS[script].split(":")
    return getattr(importlib.import_module(module), name)


def digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def test_every_command_is_walked_and_every_writer_declares(tmp_path, tiny_checkpoints):
    """A new command (or subcommand) must be listed here, and a subcommand that writes must declare."""
    from maisi.cli import Command, writes_nothing

    walked = set(cases(tmp_path, workspace(tmp_path, tiny_checkpoints["tiny-rflow"])))
    assert set(commands()) == walked | READ_ONLY, "a command is neither walked nor read-only"
    for script, sub in commands():
        if sub is None:
            continue
        command = importlib.import_module(SCRIPTS[script].split(":")[0]).COMMANDS[sub]
        assert isinstance(command, Command)
        assert (command.paths is writes_nothing) == ((script, sub) in READ_ONLY), (script, sub)


def _points(kind: str) -> list[str]:
    return ["as written", "via a symlink", "via a hard link"] + (
        ["via its folder"] if kind == "owned" else []
    )


def _target(how: str, source: Path, ws: Path) -> Path:
    if how == "as written":
        return source
    if how == "via its folder":
        return source.parent
    link = ws / "links" / how.split()[-1] / source.name
    link.parent.mkdir(parents=True, exist_ok=True)
    if how == "via a symlink":
        link.symlink_to(source)
    else:
        os.link(source, link)
    return link


def test_every_writing_command_refuses_an_output_on_each_input(tmp_path, tiny_checkpoints, capsys):
    ws = tmp_path / "ws"
    files = workspace(ws, tiny_checkpoints["tiny-rflow"])
    walked = 0
    for (script, sub), entries in cases(ws, files).items():
        for case in entries:
            for out, key in case.all_pairs():
                for how in _points(case.outputs[out]):
                    shutil.rmtree(ws / "links", ignore_errors=True)
                    source = case.inputs[key]
                    target = _target(how, source, ws)
                    argv = case.argv(out, target)  # may write its config
                    before = digests(ws)
                    capsys.readouterr()
                    code = _main(script)(argv)
                    err = capsys.readouterr().err
                    what = f"{script} {sub or ''}: {out} {how} {key}"
                    assert code == 2, f"{what}: exit {code}\n{err}"
                    assert str(target) in err and str(source) in err and key.split()[0] in err, (
                        f"{what}\n{err}"
                    )
                    assert "Traceback" not in err, f"{what}\n{err}"
                    assert digests(ws) == before, what
                    walked += 1
    assert walked > 60
