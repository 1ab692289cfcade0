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
