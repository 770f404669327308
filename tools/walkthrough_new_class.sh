#!/usr/bin/env bash
# New tumour class, end to end on CPU: give pyradiomics' lung1 tumour a class of its own, prepare the case,
# finetune the demo ControlNet with the weighted loss on the new id, and generate a CT from the tumour mask.
# Every step is a public CLI call (docs/tutorials/new-tumour-class.md shows the same commands).
#
#   python tools/fetch_sample_data.py --sources pyradiomics      # once: the lung1 CT and its tumour mask
#   bash tools/walkthrough_new_class.sh                          # about 5.5 minutes on 2 cores
#
# Environment (all optional): WORK (run folder, default runs/walkthrough), STEPS (ControlNet steps, 300),
# INFER_STEPS (rectified-flow steps of the generation, 30), CROP_MM (box around the tumour, "192 192 160"),
# SPACING (mm of the latents, "2.0, 2.0, 2.5": finer than the demo's 3.5 x 3.5 x 5 so the lesion spans latent voxels),
# CT / TUMOUR (the CT and its tumour mask, value 1; default: the fetched lung1 case), MODELS (demo weights),
# LR (finetune learning rate, 0.001), DEVICE (auto), PYTHON (default: .venv/bin/python if present). The last line printed is the generated CT's metadata JSON.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
WORK="${WORK:-runs/walkthrough}"
STEPS="${STEPS:-300}"
INFER_STEPS="${INFER_STEPS:-30}"
SPACING="${SPACING:-2.0, 2.0, 2.5}"
CROP_MM="${CROP_MM:-192 192 160}"
MODELS="${MODELS:-models/demo}"
DEVICE="${DEVICE:-auto}"
CASES=".cache/sample_data/cases/pyradiomics_lung1"
CT="${CT:-$CASES/ct.nii.gz}"
TUMOUR="${TUMOUR:-$CASES/label_source.nii.gz}"
# The interpreter that has maisi installed: $PYTHON, else the repository's .venv, else python on the PATH.
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"
else PY=python; fi
if ! "$PY" -c "import maisi" 2>/dev/null; then
  echo "walkthrough: $PY cannot import maisi; activate the venv the README's install made (. .venv/bin/activate)" \
    "or set PYTHON=/path/to/that/python" >&2
  exit 2
fi
for f in "$CT" "$TUMOUR" "$MODELS/autoencoder.pt" "$MODELS/diffusion_unet.pt" "$MODELS/controlnet.pt"; do
  [ -f "$f" ] || { echo "walkthrough: missing $f (fetch the sample data / demo weights first)" >&2; exit 2; }
done
mkdir -p "$WORK/cases/lung1"
WORK="$(cd "$WORK" && pwd)"
MODELS="$(cd "$MODELS" && pwd)"

echo "== 1. a new class in a free dummy slot of a copy of MAISI's label dictionary"
rm -f "$WORK/label_dict.json"
NEW_ID="$($PY -m maisi.labels add --name "nsclc tumor" --output "$WORK/label_dict.json" | grep -o '[0-9]\+' | tail -1)"
echo "nsclc tumor -> id $NEW_ID"

echo "== 2. the tumour mask in the new vocabulary, with the body label 200 from the CT"
$PY -m maisi.labels remap --mask "$TUMOUR" --mapping dataset/walkthrough/lung1_mapping.json \
  --label-dict "$WORK/label_dict.json" --output "$WORK/cases/lung1/tumour.nii.gz"
$PY -m maisi.labels envelope --image "$CT" --mask "$WORK/cases/lung1/tumour.nii.gz" \
  --output "$WORK/cases/lung1/envelope.nii.gz"

echo "== 3. a ${CROP_MM// / x } mm box around the tumour, and the datalist"
# shellcheck disable=SC2086  # CROP_MM is three numbers
$PY -m maisi.labels crop --image "$CT" --mask "$WORK/cases/lung1/envelope.nii.gz" --around "$NEW_ID" \
  --size-mm $CROP_MM --output-image "$WORK/cases/lung1/ct.nii.gz" --output-mask "$WORK/cases/lung1/label.nii.gz"
$PY -m maisi.datalist build --root "$WORK/cases" --images "*/ct.nii.gz" --labels '*/label.nii.gz' \
  --label-dict "$WORK/label_dict.json" --output "$WORK/cases/datalist.json"
$PY -m maisi.datalist validate --datalist "$WORK/cases/datalist.json" --label-dict "$WORK/label_dict.json"

echo "== 4. latents with the demo VAE, at $SPACING mm"
cat > "$WORK/encode.json" <<EOF
{"preset": "tiny-rflow", "autoencoder": "$MODELS/autoencoder.pt", "datalist": "cases/datalist.json",
 "output_dir": "latents", "target_spacing": [$SPACING], "latent": "mean", "device": "$DEVICE"}
EOF
$PY -m maisi.encode --config "$WORK/encode.json"

echo "== 5. finetune the demo ControlNet, loss x100 on the new class"
cat > "$WORK/controlnet.json" <<EOF
{"preset": "tiny-rflow", "datalist": "latents/datalist.json", "fold": null, "output_dir": "controlnet",
 "init": {"diffusion_unet": "$MODELS/diffusion_unet.pt", "controlnet": "$MODELS/controlnet.pt"},
 "steps": $STEPS, "seed": 0, "checkpoint_every": $STEPS, "validate_every": $STEPS, "log_every": 10,
 "optimizer": {"lr": ${LR:-0.001}, "warmup_steps": $(( STEPS / 10 )), "decay": "cosine"},
 "controlnet": {"weighted_loss": 100.0, "weighted_loss_label": [$NEW_ID], "label_dict": "label_dict.json"},
 "device": "$DEVICE"}
EOF
RESUME=""
[ -f "$WORK/controlnet/state/last.pt" ] && RESUME="--resume"
$PY -m maisi.train controlnet --config "$WORK/controlnet.json" $RESUME

echo "== 6. a CT with the tumour where the mask puts it"
cat > "$WORK/infer.json" <<EOF
{"preset": "tiny-rflow",
 "checkpoints": {"autoencoder": "$MODELS/autoencoder.pt", "diffusion_unet": "$MODELS/diffusion_unet.pt",
                 "controlnet": "controlnet/controlnet.pt"},
 "mask": "latents/lung1/ct_label.nii.gz", "label_dict": "label_dict.json",
 "sampling": {"num_inference_steps": $INFER_STEPS}, "quality_check": {"max_tries": 1},
 "output": {"dir": "generated", "prefix": "lung1_nsclc"}, "device": "$DEVICE"}
EOF
$PY -m maisi.infer --config "$WORK/infer.json"
echo "$WORK/generated/lung1_nsclc_seed0.json"
