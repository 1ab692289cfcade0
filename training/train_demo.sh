#!/usr/bin/env bash
# Train the embedded pipeline from scratch and install it as pipelines/tiny-shapes (what `make train-demo` runs):
#   1. the VAE           (-> out/tiny-shapes-vae/vae)
#   2. text-to-image     (the U-Net and CLIP text encoder, on that VAE's latents -> out/tiny-shapes/pipeline)
#   3. copy the exported pipeline folder to pipelines/tiny-shapes
# On a CPU it uses training/configs/tiny_shapes_vae.yaml and tiny_shapes_vae_128.yaml (the VAE at 64 px, then
# fine-tuned at 128 px), then tiny_shapes.yaml (times and results in the README: 1 h 31 min on the 2-core host of
# 2026-12-04); with a GPU the same recipes scaled up, tiny_shapes_vae_gpu.yaml (at 128 px in one stage) and
# tiny_shapes_gpu.yaml.
# VAE_CONFIG (one or more configs, run in order, separated by spaces) / T2I_CONFIG choose others. An interrupted
# run continues from its newest checkpoint when started again (--resume latest); a checkpoint written with other
# settings or inputs is refused, with what differs. Extra arguments are passed to every training script as
# overrides (e.g. `bash training/train_demo.sh --seed 1`); VAE_ARGS / T2I_ARGS hold overrides for the VAE stages
# or the text-to-image one (e.g. VAE_ARGS="--max_train_steps 100").
# TRAIN_THREADS sets the torch threads on a CPU (default 2, this machine's cores; on a CPU shared with other jobs,
# 1 is often faster, since OpenMP threads then wait on each other).
set -euo pipefail
cd "$(dirname "$0")/.."

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if python3 -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    LAUNCH=(python3 -m accelerate.commands.launch --config_file training/accelerate/single_gpu.yaml)
    suffix=_gpu
    default_vae=training/configs/tiny_shapes_vae_gpu.yaml
else
    export OMP_NUM_THREADS="${TRAIN_THREADS:-2}" MKL_NUM_THREADS="${TRAIN_THREADS:-2}"
    LAUNCH=(python3 -m accelerate.commands.launch --config_file training/accelerate/single_cpu.yaml)
    suffix=
    default_vae="training/configs/tiny_shapes_vae.yaml training/configs/tiny_shapes_vae_128.yaml"
fi
read -r -a VAE_CONFIGS <<< "${VAE_CONFIG:-$default_vae}"
T2I_CONFIG="${T2I_CONFIG:-training/configs/tiny_shapes$suffix.yaml}"
read -r -a VAE_EXTRA <<< "${VAE_ARGS:-}"
read -r -a T2I_EXTRA <<< "${T2I_ARGS:-}"
DEST=pipelines/tiny-shapes
started=$SECONDS

for config in "${VAE_CONFIGS[@]}"; do
    echo "== 1/3 VAE ($config)"
    "${LAUNCH[@]}" training/train_vae.py --config "$config" --resume latest "${VAE_EXTRA[@]}" "$@"
done
vae_done=$SECONDS
echo "VAE: $(( vae_done - started )) s"

echo "== 2/3 U-Net + text encoder ($T2I_CONFIG)"
"${LAUNCH[@]}" training/train_text_to_image.py --config "$T2I_CONFIG" --resume latest "${T2I_EXTRA[@]}" "$@"
echo "text-to-image: $(( SECONDS - vae_done )) s"

echo "== 3/3 install out/tiny-shapes/pipeline as $DEST"
test -f out/tiny-shapes/pipeline/model_index.json || { echo "out/tiny-shapes/pipeline was not written" >&2; exit 1; }
rm -rf "$DEST.tmp"
cp -r out/tiny-shapes/pipeline "$DEST.tmp"
rm -rf "$DEST"
mv "$DEST.tmp" "$DEST"
du -sh "$DEST"
echo "done in $(( SECONDS - started )) s; try: latentdiff generate \"a small red circle in the center on a white background\""
