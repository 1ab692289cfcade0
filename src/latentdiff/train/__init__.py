"""The training machinery behind `latentdiff.training` (import from there): config.py (YAML configs and
overrides), data.py (sample order and per-sample randomness), loss.py (the objectives), ema.py, checkpointing.py
(atomic checkpoints, resuming), loop.py (the loop both scripts share), text_to_image.py and vae.py (the two tasks)."""
