"""Torch threads chosen for the machine (:mod:`maisi.threads`) and what every CLI checks before its heavy
imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from maisi import infer, threads
from maisi.threads import MachineFacts, decide_threads

REPO = Path(__file__).resolve().parents[1]


def facts(online=2, affinity=2, quota=None, load=0.0, local=1, omp=None) -> MachineFacts:  # a fake machine
    return MachineFacts(online, affinity, quota, load, local, omp)


DECISIONS = [
    # (what, setting, machine, threads, reason)
    ("idle 2 cores", "auto", facts(), 2, "auto: 2 usable CPUs, load 0.0 -> 2"),
    ("2 cores, load 13.1", "auto", facts(load=13.1), 1, "auto: 2 usable CPUs, load 13.1 -> 1"),
    ("2 cores, one other job", "auto", facts(load=1.0), 1, "auto: 2 usable CPUs, load 1.0 -> 1"),
    ("2 cores, light load", "auto", facts(load=0.4), 2, "auto: 2 usable CPUs, load 0.4 -> 2"),
    ("16 cores, load 4", "auto", facts(16, 16, load=4.0), 12, "auto: 16 usable CPUs, load 4.0 -> 12"),
    (
        "affinity 4 of 64, machine half busy",
        "auto",
        facts(64, 4, load=32.0),
        2,
        "auto: 4 usable CPUs, load 32.0 on 64 online CPUs -> 2",
    ),
    (
        "cgroup quota 1.5 of 8",
        "auto",
        facts(8, 8, quota=1.5),
        2,
        "auto: 2 usable CPUs (cgroup quota 1.5 of 8), load 0.0 on 8 online CPUs -> 2",
    ),
    (
        "cgroup quota 0.5",
        "auto",
        facts(8, 8, quota=0.5),
        1,
        "auto: 1 usable CPU (cgroup quota 0.5 of 8), load 0.0 on 8 online CPUs -> 1",
    ),
    (
        "torchrun 2 on 2 idle cores",
        "auto",
        facts(local=2),
        1,
        "auto: 2 usable CPUs, 2 local processes, load 0.0 -> 1",
    ),
    (
        "torchrun 4 on 16 idle cores",
        "auto",
        facts(16, 16, local=4),
        4,
        "auto: 16 usable CPUs, 4 local processes, load 0.0 -> 4",
    ),
    (
        "torchrun 4 on 16 cores, load 8",
        "auto",
        facts(16, 16, load=8.0, local=4),
        2,
        "auto: 16 usable CPUs, 4 local processes, load 8.0 -> 2",
    ),
    (
        "more processes than CPUs",
        "auto",
        facts(local=4),
        1,
        "auto: 2 usable CPUs, 4 local processes, load 0.0 -> 1",
    ),
    (
        "the user's OMP_NUM_THREADS",
        "auto",
        facts(load=9.0, omp=3),
        3,
        "auto: OMP_NUM_THREADS=3 in the environment -> 3",
    ),
    ("a number wins", 2, facts(load=13.1, omp=1), 2, "set to 2"),
]


@pytest.mark.parametrize(
    "setting, machine, expected, reason", [d[1:] for d in DECISIONS], ids=[d[0] for d in DECISIONS]
)
def test_the_decision_on_fake_machines(setting, machine, expected, reason):
    choice = decide_threads(setting, machine)
    assert (choice.threads, choice.reason, choice.setting) == (expected, reason, setting)


@pytest.mark.parametrize(
    "files, quota",
    [
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.0),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
    ],
    ids=["v2 unlimited", "v2 1.5 CPUs", "v1 2 CPUs", "v1 unlimited", "no cgroup"],
)
def test_the_cgroup_quota_is_read_from_v2_and_v1(tmp_path, files, quota):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert threads.cgroup_quota(tmp_path) == quota


def test_the_machine_is_read_from_affinity_load_and_torchrun(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (7.5, 1.0, 1.0))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # torchrun sets it itself: not the user's then
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    machine = threads.read_machine()
    assert (machine.affinity_cpus, machine.load, machine.local_world_size, machine.omp_num_threads) == (
        3,
        7.5,
        3,
        None,
    )
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert threads.read_machine().omp_num_threads == 1


@pytest.fixture
def torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
    threads._current = None


def test_the_setting_reaches_torch_and_the_sample_metadata(infer_config, tmp_path, torch_threads):
    torch.set_num_threads(2)
    assert infer.main(["--config", str(infer_config(threads=1))]) == 0
    assert torch.get_num_threads() == 1
    meta = json.loads((tmp_path / "out" / "sample_seed0.json").read_text())
    assert meta["threads"] == {"setting": 1, "threads": 1, "reason": "set to 1"}
    assert meta["config"]["threads"] == 1


def test_auto_is_recorded_with_its_reason(infer_config, tmp_path, torch_threads, monkeypatch, capsys):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(threads, "read_machine", lambda: facts(load=13.1))
    assert infer.main(["--config", str(infer_config()), "--dry-run"]) == 0
    assert torch.get_num_threads() == 1
    assert threads.record() == {
        "setting": "auto",
        "threads": 1,
        "reason": "auto: 2 usable CPUs, load 13.1 -> 1",
    }
    assert json.loads(capsys.readouterr().out)["threads"] == "auto"


def test_the_flag_overrides_the_config(infer_config, torch_threads, capsys):
    assert infer.main(["--config", str(infer_config(threads=2)), "--threads", "1", "--dry-run"]) == 0
    assert torch.get_num_threads() == 1 and threads.record()["setting"] == 1


@pytest.mark.parametrize("value", ["0", "-2", "many", "1.5"])
def test_a_bad_flag_exits_2_naming_it(value, infer_config, capsys):
    with pytest.raises(SystemExit) as exc:
        infer.main(["--config", str(infer_config()), "--threads", value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--threads" in err and value in err


@pytest.mark.parametrize("value", [0, -1, "many", 1.5, None])
@pytest.mark.parametrize("kind", ["infer", "encode", "train", "evaluate"])
def test_a_bad_config_value_exits_2_naming_it(kind, value, tmp_path):
    from maisi.config import load_config
    from maisi.errors import ConfigError

    config = _config_with_missing_input(kind, tmp_path)
    data = json.loads(config.read_text())
    data["threads"] = value
    config.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as exc:
        load_config(config, kind)
    assert "$.threads" in str(exc.value)


def _config_with_missing_input(kind: str, tmp_path: Path) -> Path:
    """A shipped config of ``kind`` whose mask (infer) or datalist (the others) is missing, outputs in tmp."""
    shipped = {
        "infer": "inference.json",
        "encode": "encode_sample_data.json",
        "train": "train_sample_data.json",
        "evaluate": "evaluate_example.json",
    }[kind]
    data = json.loads((REPO / "configs" / shipped).read_text())
    missing = str(tmp_path / "missing.nii.gz" if kind == "infer" else tmp_path / "missing.json")
    if kind == "infer":
        data["checkpoints"] = {
            k: str((REPO / "configs" / v).resolve()) for k, v in data["checkpoints"].items()
        }
        data["mask"], data["output"]["dir"] = missing, str(tmp_path / "out")
    elif kind == "evaluate":
        data["real_datalist"], data["synthetic"] = missing, str(tmp_path / "*_image.nii.gz")
        data["output"] = {"report": str(tmp_path / "report.json"), "montage": None}
    else:
        data["datalist"], data["output_dir"] = missing, str(tmp_path / "out")
        if kind == "encode":
            data["autoencoder"] = str(REPO / "models" / "demo" / "autoencoder.pt")
    path = tmp_path / f"{kind}.json"
    path.write_text(json.dumps(data))
    return path


WRAPPER = """
import json, sys
from maisi import {module}
code = {module}.main({argv!r})
loaded = {{name: name in sys.modules for name in ("monai.networks", "torch")}}
print(json.dumps({{"code": code, **loaded}}))
"""


@pytest.mark.parametrize("kind", ["infer", "encode", "train", "evaluate"])
def test_a_missing_input_exits_2_before_torch_and_monai_networks_are_imported(kind, tmp_path):
    config = _config_with_missing_input(kind, tmp_path)
    argv = ["diffusion", "--config", str(config)] if kind == "train" else ["--config", str(config)]
    script = WRAPPER.format(module=kind, argv=argv)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"code": 2, "monai.networks": False, "torch": False}, done.stderr
    key = "$.mask" if kind == "infer" else "$.real_datalist" if kind == "evaluate" else "$.datalist"
    assert (
        f"{key}: {tmp_path / ('missing.nii.gz' if kind == 'infer' else 'missing.json')}: file not found"
        in done.stderr
    )


APPLY = """
import json, os
from maisi.threads import apply_threads
choice = apply_threads({setting!r})
import torch
print(json.dumps({{"threads": torch.get_num_threads(), "reason": choice.reason,
                  "omp": os.environ.get("OMP_NUM_THREADS"), "wait": os.environ.get("OMP_WAIT_POLICY")}}))
"""


@pytest.mark.parametrize(
    "setting, env, expected",
    [
        (2, {}, {"threads": 2, "reason": "set to 2, OMP_WAIT_POLICY=PASSIVE", "omp": "2", "wait": "PASSIVE"}),
        (
            2,
            {"OMP_WAIT_POLICY": "ACTIVE"},
            {"threads": 2, "reason": "set to 2", "omp": "2", "wait": "ACTIVE"},
        ),
        (1, {}, {"threads": 1, "reason": "set to 1", "omp": "1", "wait": None}),
        (
            "auto",
            {"OMP_NUM_THREADS": "1"},
            {
                "threads": 1,
                "reason": "auto: OMP_NUM_THREADS=1 in the environment -> 1",
                "omp": "1",
                "wait": None,
            },
        ),
    ],
    ids=["2 threads sleep while waiting", "the user's wait policy", "1 thread", "the user's OMP_NUM_THREADS"],
)
def test_openmp_is_set_up_before_torch_is_imported(setting, env, expected):
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), **env}
    script = APPLY.format(setting=setting)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert json.loads(done.stdout.strip().splitlines()[-1]) == expected, done.stderr
