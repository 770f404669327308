"""The config layer is pure: importing it, and loading and checking every shipped config, loads neither
torch nor MONAI (so ``--help`` and ``--dry-run`` stay fast and a config can be checked anywhere)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = """
import json, sys
from pathlib import Path

import maisi.config
from maisi.config import load_config
from maisi.families.checks import load_checked_config

kinds = {"inference": "infer", "encode": "encode", "train": "train", "evaluate": "evaluate"}
loaded = []
for path in sorted(Path(sys.argv[1]).glob("*.json")):
    kind = next((k for prefix, k in kinds.items() if path.name.startswith(prefix)), None)
    if kind is not None:
        load_config(path, kind)
        load_checked_config(path, kind)
        loaded.append(path.name)
print(json.dumps({"loaded": loaded, "heavy": sorted({"torch", "monai"} & set(sys.modules))}))
"""


def test_config_layer_and_shipped_configs_load_without_torch_or_monai():
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(REPO / "configs")], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(report["loaded"]) == len(list((REPO / "configs").glob("*.json"))) - 1  # all but label_dict
    assert report["heavy"] == []
