"""Write randomly initialised (untrained) checkpoints of a preset, seeded, in our checkpoint format.

They exercise the whole pipeline (configs, loading, sampling, decoding, writing) before trained weights
exist; what they generate is structured noise with the right geometry and HU range, not anatomy.

    python tools/make_untrained_checkpoints.py --preset tiny-rflow --dest models/untrained/tiny-rflow
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from maisi.checkpoints import save_checkpoint
from maisi.families.ct import PRESETS, get_preset
from maisi.families.networks import build_network


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-rflow", choices=sorted(PRESETS))
    parser.add_argument("--dest", type=Path, default=None, help="default: models/untrained/<preset>")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    preset = get_preset(args.preset)
    dest = args.dest or Path(__file__).resolve().parents[1] / "models" / "untrained" / preset.name
    torch.manual_seed(args.seed)
    for part in preset.parts:  # the MR presets have no ControlNet
        path = save_checkpoint(
            dest / f"{part}.pt",
            build_network(preset, part),
            preset,
            part,
            scale_factor=1.0 if part == "diffusion_unet" else None,
        )
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
