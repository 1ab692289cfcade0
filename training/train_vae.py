"""Train the VAE (AutoencoderKL) that a text-to-image run then uses through `vae_path: <output_dir>/vae`.

    accelerate launch training/train_vae.py --config training/configs/vae_smoke.yaml [--key value ...]

The keys are documented in latentdiff/train/config.py (VAETrainConfig). The work is done by latentdiff.training.
"""
import sys

from latentdiff.training import VAETrainConfig, run_script, train_vae

if __name__ == "__main__":
    sys.exit(run_script(VAETrainConfig, train_vae, sys.argv[1:]))
