#!/usr/bin/env bash
# The embedded pipeline's recipe (training/train_demo.sh, GPU configs) fitted into a fixed wall-clock budget: how
# pipelines/tiny-shapes was made on a lent GPU machine, whose time is metered. Each stage first trains a few steps
# to measure its steps/s, then runs as many steps as its share of the budget allows (the cosine schedule needs
# the count up front). The step counts it chose are printed and belong in the configs afterwards, so that
# `make train-demo` reproduces the run.
#   BUDGET=480 VAE_SHARE=0.3 bash training/train_demo_timed.sh
# Writes out/timed-vae/vae and out/timed/pipeline (fresh runs: the folders must not exist yet) and installs the
# latter as pipelines/tiny-shapes (INSTALL=0: not). VAE_PATH=<a trained VAE folder> skips the VAE stage and gives
# the whole budget to the text-to-image one (e.g. VAE_PATH=pipelines/tiny-shapes/vae, the shipped VAE, which is
# what tiny_shapes_vae_gpu.yaml made).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
BUDGET="${BUDGET:-480}"        # seconds for both stages, probes and exports included
VAE_SHARE="${VAE_SHARE:-0.3}"  # the VAE's share of the training time
RESERVE="${RESERVE:-40}"       # seconds kept for exports and the install
MIN_STEPS="${MIN_STEPS:-100}"
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"  # overrides for every run (a CPU smoke test shrinks the data with these)
LAUNCH=(python3 -m accelerate.commands.launch --config_file training/accelerate/single_gpu.yaml)
VAE_CONFIG=training/configs/tiny_shapes_vae_gpu.yaml
T2I_CONFIG=training/configs/tiny_shapes_gpu.yaml
start=$SECONDS

steps_for() {  # log.jsonl seconds -> steps that fit, from the median steps/s after the first 10 steps
    python3 - "$1" "$2" "$MIN_STEPS" <<'PY'
import json, statistics, sys
rates = [r["steps_per_s"] for r in map(json.loads, open(sys.argv[1])) if r["step"] > 10]
print(max(int(sys.argv[3]), int(statistics.median(rates) * float(sys.argv[2]) * 0.95)))
PY
}

VAE_DIR=out/timed-vae T2I_DIR=out/timed
fresh=("$T2I_DIR"); [ -n "${VAE_PATH:-}" ] || fresh+=("$VAE_DIR")
for d in "${fresh[@]}"; do
    [ ! -e "$d" ] || { echo "$d exists: move it away (this script makes fresh runs)" >&2; exit 1; }
done
rm -rf out/probe-vae out/probe-t2i
vae_steps=0
if [ -n "${VAE_PATH:-}" ]; then
    [ -f "$VAE_PATH/config.json" ] || { echo "VAE_PATH=$VAE_PATH holds no VAE (no config.json)" >&2; exit 1; }
    VAE="$VAE_PATH"
    echo "== VAE: $VAE (given; no VAE training)"
else
    echo "== probe: VAE"
    "${LAUNCH[@]}" training/train_vae.py --config "$VAE_CONFIG" --output_dir out/probe-vae --max_train_steps 40 \
        --checkpointing_steps 0 --check_reconstructions 0 --scale_samples 16 "${EXTRA[@]}"
    train_left=$(( BUDGET - (SECONDS - start) - RESERVE ))
    vae_steps=$(steps_for out/probe-vae/log.jsonl "$(python3 -c "print($train_left * $VAE_SHARE - 15)")")
    echo "== VAE: $vae_steps steps"
    "${LAUNCH[@]}" training/train_vae.py --config "$VAE_CONFIG" --output_dir "$VAE_DIR" \
        --max_train_steps "$vae_steps" "${EXTRA[@]}"
    VAE="$VAE_DIR/vae"
fi

echo "== probe: text-to-image (also builds the latent cache)"
"${LAUNCH[@]}" training/train_text_to_image.py --config "$T2I_CONFIG" --output_dir out/probe-t2i \
    --vae_path "$VAE" --max_train_steps 40 --checkpointing_steps 0 "${EXTRA[@]}"
mkdir -p "$T2I_DIR"
cp out/probe-t2i/latent_cache.safetensors out/probe-t2i/latent_cache.json "$T2I_DIR/"
t2i_left=$(( BUDGET - (SECONDS - start) - RESERVE ))
t2i_steps=$(steps_for out/probe-t2i/log.jsonl "$(( t2i_left - 15 ))")
echo "== text-to-image: $t2i_steps steps"
"${LAUNCH[@]}" training/train_text_to_image.py --config "$T2I_CONFIG" --output_dir "$T2I_DIR" \
    --vae_path "$VAE" --max_train_steps "$t2i_steps" "${EXTRA[@]}"

if [ "${INSTALL:-1}" = 1 ]; then
    rm -rf pipelines/tiny-shapes.tmp
    cp -r "$T2I_DIR/pipeline" pipelines/tiny-shapes.tmp
    rm -rf pipelines/tiny-shapes
    mv pipelines/tiny-shapes.tmp pipelines/tiny-shapes
fi
echo "done in $(( SECONDS - start )) s: VAE $vae_steps steps, text-to-image $t2i_steps steps"
