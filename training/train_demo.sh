#!/usr/bin/env bash
# Train the embedded pipeline from scratch and install it as pipelines/tiny-shapes (what `make train-demo` runs):
#   1. the VAE           (training/configs/tiny_shapes_vae.yaml -> out/tiny-shapes-vae/vae)
#   2. text-to-image     (training/configs/tiny_shapes.yaml: the U-Net and CLIP text encoder, on that VAE's latents
#                         -> out/tiny-shapes/pipeline)
#   3. copy the exported pipeline folder to pipelines/tiny-shapes
# An interrupted run continues from its newest checkpoint when started again (--resume latest). Extra arguments are
# passed to both training scripts as overrides, e.g. `bash training/train_demo.sh --seed 1`.
# TRAIN_THREADS sets the torch threads (default 2, this machine's cores; on a CPU shared with other jobs, 1 is
# often faster, since OpenMP threads then wait on each other).
set -euo pipefail
cd "$(dirname "$0")/.."

export OMP_NUM_THREADS="${TRAIN_THREADS:-2}" MKL_NUM_THREADS="${TRAIN_THREADS:-2}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
LAUNCH=(accelerate launch --config_file training/accelerate/single_cpu.yaml)
DEST=pipelines/tiny-shapes
started=$SECONDS

echo "== 1/3 VAE (training/configs/tiny_shapes_vae.yaml)"
"${LAUNCH[@]}" training/train_vae.py --config training/configs/tiny_shapes_vae.yaml --resume latest "$@"
vae_done=$SECONDS
echo "VAE: $(( (vae_done - started) / 60 )) min"

# With a KL weight this small, the encoder parks a few latent positions at huge posterior variance (logvar up to
# ~18, std in the thousands) where the decoder ignores them. Sampling those positions would feed the U-Net noise
# of size ~1e3, and train_vae.py's scaling_factor (1 / std of posterior samples) is dominated by them, leaving the
# useful latents at std ~0.1 instead of 1. So the encoder is made deterministic (q(z|x) = delta at its mean: the
# logvar outputs of quant_conv are pinned to -30, the clamp floor) and scaling_factor recomputed from the means.
python - out/tiny-shapes-vae/vae <<'PY'
import sys

import torch

from latentdiff.data.shapes import ShapesDataset, to_tensor
from latentdiff.models.vae import AutoencoderKL

folder = sys.argv[1]
vae = AutoencoderKL.from_pretrained(folder).eval()
c = vae.config.latent_channels
with torch.no_grad():
    vae.quant_conv.weight[c:] = 0.0
    vae.quant_conv.bias[c:] = -30.0
    data = ShapesDataset(256, size=128, seed=1)
    means = torch.cat([vae.encode(torch.stack([to_tensor(data.item(i)[1]) for i in range(s, s + 32)])).mean
                       for s in range(0, 256, 32)])
vae.config = vae.config.replace(scaling_factor=1.0 / means.double().std().item())
vae.save_pretrained(folder)
print(f"{folder}: deterministic encoder, latent std {means.std().item():.4f}, "
      f"scaling_factor {vae.config.scaling_factor:.5f}")
PY

echo "== 2/3 U-Net + text encoder (training/configs/tiny_shapes.yaml)"
"${LAUNCH[@]}" training/train_text_to_image.py --config training/configs/tiny_shapes.yaml --resume latest "$@"
echo "text-to-image: $(( (SECONDS - vae_done) / 60 )) min"

echo "== 3/3 install out/tiny-shapes/pipeline as $DEST"
test -f out/tiny-shapes/pipeline/model_index.json || { echo "out/tiny-shapes/pipeline was not written" >&2; exit 1; }
rm -rf "$DEST.tmp"
cp -r out/tiny-shapes/pipeline "$DEST.tmp"
rm -rf "$DEST"
mv "$DEST.tmp" "$DEST"
du -sh "$DEST"
echo "done in $(( (SECONDS - started) / 60 )) min; try: latentdiff generate \"a small red circle in the center on a white background\""
