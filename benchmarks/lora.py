"""What a loaded LoRA costs, ours against diffusers (peft) in one process: SD 1.5's U-Net (random weights), a
rank-r adapter on every attention projection (to_q, to_k, to_v, to_out.0), one guided step (batch 2).

    python benchmarks/lora.py [--quick] [--size 64] [--rank 64] [--repeats 3] [--threads N]

Prints seconds per forward, interleaved per phase: without LoRA (the baseline of both), with the LoRA loaded
(diffusers runs peft's low-rank path beside each adapted layer; ours merged it into the weights when loaded), and
with diffusers' LoRA fused (fuse_lora). Then what changing an adapter's weight costs: diffusers' set_adapters (a
scale on its layers) and ours (the adapted weights recomputed from the kept originals), and the bytes ours keeps
for those originals.
"""
from __future__ import annotations

import argparse
import time

import torch

from common import gaussian_init_, machine, print_table, setup, time_interleaved


def lora_state(unet: torch.nn.Module, rank: int) -> dict[str, torch.Tensor]:
    """peft keys (lora_A, lora_B) for every attention projection, both factors random (a trained adapter)."""
    g = torch.Generator().manual_seed(1)
    state = {}
    for path, layer in unet.named_modules():
        if path.endswith(("to_q", "to_k", "to_v", "to_out.0")) and isinstance(layer, torch.nn.Linear):
            scale = layer.in_features ** -0.5
            state[f"{path}.lora_A.weight"] = torch.randn(rank, layer.in_features, generator=g) * scale
            state[f"{path}.lora_B.weight"] = torch.randn(layer.out_features, rank, generator=g) * 0.01
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="32x32 latents, 2 repeats")
    parser.add_argument("--size", type=int, default=64, help="latent height and width")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.quick:
        args.size, args.repeats = 32, 2
    setup(args.threads)
    print(machine())
    import diffusers

    from latentdiff.checkpoints import load_into
    from latentdiff.lora import LoRALoaderMixin, adapters_of
    from latentdiff.models.unet import UNet2DConditionModel, UNetConfig

    config = UNetConfig.sd15()
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel(**{k: v for k, v in config.to_dict().items() if not k.startswith("_")})
        ours = UNet2DConditionModel(config)
    ref = gaussian_init_(ref.to_empty(device="cpu")).eval().requires_grad_(False)
    ours = load_into(ours, {k: v.clone() for k, v in ref.state_dict().items()}, "benchmark").eval()

    class UNetOnly(LoRALoaderMixin):  # the pipeline methods over a U-Net alone
        def __init__(self, unet):
            self.unet, self.text_encoder, self._compile_options = unet, torch.nn.Module(), None

    holder = UNetOnly(ours)
    x = torch.randn(2, 4, args.size, args.size, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(2, 77, config.cross_attention_dim, generator=torch.Generator().manual_seed(2))
    calls = {"diffusers": lambda: ref(x, 500, ctx).sample, "ours": lambda: ours(x, 500, ctx)}
    rows = []

    def phase(name: str) -> None:
        timings = time_interleaved(calls, args.repeats, memory=False)
        for variant, timing in timings.items():
            ratio = timings["diffusers"].median / timing.median
            rows.append({"phase": name, "variant": variant, "median s": f"{timing.median:.3f}",
                         "best s": f"{timing.best:.3f}", "vs diffusers": f"{ratio:.2f}x"})

    phase("no LoRA")
    with torch.no_grad():
        plain = ours(x, 500, ctx)
    state = lora_state(ref, args.rank)
    ref.load_lora_adapter(dict(state), prefix=None, adapter_name="style")
    start = time.perf_counter()
    holder.load_lora_weights({f"unet.{k}": v for k, v in state.items()}, adapter_name="style")
    load_s = time.perf_counter() - start
    with torch.no_grad():
        diff = (ours(x, 500, ctx) - ref(x, 500, ctx).sample).abs().max().item()
        moved = (ours(x, 500, ctx) - plain).abs().max().item()
    print(f"LoRA rank {args.rank} on {len(state) // 2} projections: ours vs diffusers max|diff| {diff:.1e} "
          f"(the LoRA moves the output by {moved:.2f}); ours loaded (merged) in {load_s:.2f} s")
    phase("LoRA loaded")
    ref.fuse_lora(lora_scale=1.0)
    phase("LoRA fused (diffusers' fuse_lora)")
    ref.unfuse_lora()
    changes = {"diffusers": lambda w: ref.set_adapters(["style"], [w]),
               "ours": lambda w: holder.set_adapters(["style"], [w])}
    for variant, change in changes.items():
        times = []
        for w in (0.5, 0.7, 0.9):
            start = time.perf_counter()
            change(w)
            times.append(time.perf_counter() - start)
        rows.append({"phase": "set_adapters (weight change)", "variant": variant,
                     "median s": f"{sorted(times)[1]:.3f}", "best s": f"{min(times):.3f}", "vs diffusers": ""})
    kept = sum(t.numel() * t.element_size() for t in adapters_of(ours).originals.values())
    print_table(rows, ["phase", "variant", "median s", "best s", "vs diffusers"])
    print(f"ours keeps the adapted layers' original weights: {kept / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
