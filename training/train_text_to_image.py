"""Train a text-to-image latent diffusion model (the U-Net, optionally the text encoder too).

    accelerate launch training/train_text_to_image.py --config training/configs/smoke.yaml [--key value ...]

Overrides use the config's own keys (--output_dir out/run --max_train_steps 10 --resume latest); the keys are
documented in latentdiff/train/config.py (TextToImageConfig). The work is done by latentdiff.training.
"""
import sys

from latentdiff.training import TextToImageConfig, run_script, train_text_to_image

if __name__ == "__main__":
    sys.exit(run_script(TextToImageConfig, train_text_to_image, sys.argv[1:]))
