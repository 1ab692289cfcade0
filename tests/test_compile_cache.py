"""compile(cache_dir=): models compiled ahead of time (AOTInductor) into packages kept on disk, found again by a key
of everything their code depends on, loaded by later models and processes instead of compiling again."""
import json
import os
import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from latentdiff.compile_cache import CachedCompiledModel, call_key, settings_digest, weights_digest
from latentdiff.pipeline import inductor_settings

needs_compiler = pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")),
                                    reason="inductor needs a C++ compiler")


def small_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.GroupNorm(2, 8), torch.nn.SiLU(),
                               torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 5)).eval()


def cached(model, folder, fallback=None):
    return CachedCompiledModel(model, folder, lambda: inductor_settings("cpu", max_autotune=False),
                               fallback or (lambda: model))


X = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(1))


def test_call_key_names_the_layout_and_the_plain_values():
    x, t = torch.zeros(2, 4, 8, 8), torch.tensor(3.0)
    key = call_key((x, t), {"scale": 1.0, "extra": [x[:1], None]})
    assert key == call_key((torch.ones(2, 4, 8, 8), torch.tensor(9.0)),
                           {"scale": 1.0, "extra": [torch.ones(1, 4, 8, 8), None]})  # (tensors' values: inputs)
    for args, kwargs in [((x, t), {"scale": 2.0, "extra": [x[:1], None]}),  # a number's value (baked in)
                         ((x[:1], t), {"scale": 1.0, "extra": [x[:1], None]}),  # a shape
                         ((x.to(memory_format=torch.channels_last), t), {"scale": 1.0, "extra": [x[:1], None]}),
                         ((x.double(), t), {"scale": 1.0, "extra": [x[:1], None]}),  # a dtype
                         ((x, t), {"scale": 1.0, "extra": (x[:1], None)}),  # the nesting
                         ((x, t), {"scale": 1.0, "extra": [x[:1]]})]:
        assert call_key(args, kwargs) != key, (args, kwargs)
    assert call_key((x, x), {}) is None  # (one tensor twice: a package takes distinct inputs)
    assert call_key((x, object()), {}) is None
    assert "0x" not in key and json.loads(key)  # (nothing of this process: an address, an id)


def test_digests_follow_the_weights_and_the_modules_settings():
    from latentdiff import UNet2DConditionModel
    from latentdiff.models.attention import TextProjections
    from latentdiff.models.unet import UNetConfig
    from tiny import TINY_UNET, randomized

    unet = randomized(UNet2DConditionModel(UNetConfig(**TINY_UNET)), 3).eval()
    weights, settings = weights_digest(unet), settings_digest(unet)
    with torch.no_grad():
        unet(torch.randn(2, 4, 8, 8), 500, torch.randn(2, 77, 32))
    assert (weights_digest(unet), settings_digest(unet)) == (weights, settings)  # (a call changes neither)
    with torch.no_grad(), TextProjections.of(unet).given(torch.randn(2, 77, 32)):
        pass  # (nor a torch.compile'd call's cache of the text's projections, kept on the U-Net)
    assert settings_digest(unet) == settings and "_text_projections" in vars(unet)
    unet.enable_freeu(0.9, 0.2, 1.5, 1.6)
    assert settings_digest(unet) != settings
    unet.disable_freeu()
    assert settings_digest(unet) == settings
    unet.train()
    assert settings_digest(unet) != settings
    unet.eval()
    handle = unet.conv_in.register_forward_hook(lambda module, args, out: out * 2)
    assert settings_digest(unet) != settings
    handle.remove()
    with torch.no_grad():
        unet.conv_in.weight[0, 0, 0, 0] += 1e-6
    assert weights_digest(unet) != weights and settings_digest(unet) == settings


def test_the_settings_watch_sees_every_change_the_digest_would():
    """The settings are digested again only where Settings.unchanged() saw a change (its check costs a small part
    of a digest): every change below must show in both; calls and settings set to their own values in neither."""
    import types

    from latentdiff import UNet2DConditionModel
    from latentdiff.compile_cache import Settings
    from latentdiff.models.unet import UNetConfig
    from tiny import TINY_UNET, randomized

    unet = randomized(UNet2DConditionModel(UNetConfig(**TINY_UNET)), 3).eval()
    unet.conv_in.extra = types.SimpleNamespace(scale=1.0, per_layer=[1.0, 0.5], table={"a": [1]})
    unet.conv_in.mask = torch.ones(3)

    class Conv(torch.nn.Conv2d):
        pass

    changes = [lambda: unet.enable_freeu(0.9, 0.2, 1.5, 1.6), unet.train, unet.eval,
               lambda: unet.conv_in.register_forward_hook(lambda module, args, out: out * 2),
               lambda: setattr(unet.conv_in.extra, "scale", 0.5),
               lambda: unet.conv_in.extra.per_layer.__setitem__(1, 0.25),
               lambda: unet.conv_in.extra.table["a"].append(2),
               lambda: setattr(unet.conv_in.extra, "added", "x"),
               lambda: unet.conv_in.mask.mul_(2),
               lambda: setattr(unet, "conv_out", torch.nn.Conv2d(unet.conv_out.in_channels, 4, 1)),
               lambda: setattr(unet.conv_out, "__class__", Conv),
               # (a module held as a plain attribute, outside the tree, as an IP-Adapter's layers: its weights too)
               lambda: object.__setattr__(unet.conv_in, "side", torch.nn.Linear(3, 3)),
               lambda: object.__setattr__(unet.conv_in, "side", torch.nn.Linear(3, 3)),
               lambda: unet.conv_out.padding_mode.__class__]  # (the last changes nothing)
    watch = Settings(unet)
    digest = watch.digest
    with torch.no_grad():
        unet(torch.randn(2, 4, 8, 8), 500, torch.randn(2, 77, 32))
    unet.conv_in.extra.scale = 1.0
    unet.training = False
    assert watch.unchanged() and settings_digest(unet) == digest
    for i, change in enumerate(changes):
        change()
        if i == len(changes) - 1:
            assert watch.unchanged() and settings_digest(unet) == digest
        else:
            assert not watch.unchanged() and settings_digest(unet) != digest, i
        watch = Settings(unet)
        digest = watch.digest
        assert watch.unchanged()

    class Calls:  # (an object whose class names what its calls computed, as the IP-Adapters' do)
        _caches = ("memo",)

        def __init__(self):
            self.scale, self.memo = 1.0, None

    object.__setattr__(unet.conv_in, "calls", Calls())
    assert settings_digest(unet) != digest
    digest = settings_digest(unet)
    unet.conv_in.calls.memo = torch.randn(3)
    assert settings_digest(unet) == digest


def loaded(folder, lora, ip):
    """The pipeline with a LoRA, an IP-Adapter and fused attention projections (this function's source runs in
    the other process too)."""
    from latentdiff import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_pretrained(folder)
    pipe.fuse_qkv_projections()
    pipe.load_lora_weights(lora)
    pipe.load_ip_adapter(ip, weight_name="ip.safetensors")
    pipe.set_ip_adapter_scale(0.7)
    return pipe


def test_digests_are_the_same_in_another_process(tiny_folders, ip_folder, tmp_path):
    """A key that named anything of its process (an address, an id, a counter) would never be found again: the
    U-Net with a LoRA and an IP-Adapter loaded, after a call (which leaves caches in the IP-Adapters and the
    attention layers), against the same loaded in a new process. Loading another IP-Adapter of the same shapes
    changes the settings (its layers are plain attributes of the U-Net, outside its weights); a LoRA scale set
    back gives the same settings."""
    import inspect

    from safetensors.torch import load_file, save_file

    from latentdiff import UNet2DConditionModel
    from latentdiff.compile_cache import Settings
    from test_ip_adapter import IMAGE
    from tiny import generate

    g = torch.Generator().manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(tiny_folders[0] / "unet")
    lora = {f"unet.{path}.lora_{ab}.weight": torch.randn(*shape, generator=g)
            for path, layer in unet.named_modules() if path.endswith("attn2.to_k")
            for ab, shape in (("A", (2, layer.in_features)), ("B", (layer.out_features, 2)))}
    save_file(lora, tmp_path / "lora.safetensors")
    args = [str(tiny_folders[0]), str(tmp_path / "lora.safetensors"), str(ip_folder)]
    script = (f"import sys\n{inspect.getsource(loaded)}\npipe = loaded(*sys.argv[1:])\n"
              "from latentdiff.compile_cache import settings_digest, weights_digest\n"
              "print(weights_digest(pipe.unet), settings_digest(pipe.unet))")
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, check=True)
    pipe = loaded(*args)
    generate(pipe, ip_adapter_image=IMAGE)
    settings = Settings(pipe.unet)
    assert out.stdout.split() == [weights_digest(pipe.unet), settings.digest]
    pipe.set_adapters("default_0", 0.5)
    pipe.set_adapters("default_0", 1.0)
    assert settings_digest(pipe.unet) == settings.digest
    state = load_file(ip_folder / "ip.safetensors")
    shutil.copytree(ip_folder / "image_encoder", tmp_path / "other" / "image_encoder")
    save_file({k: v * 1.01 if "to_k_ip" in k else v for k, v in state.items()}, tmp_path / "other" / "ip.safetensors")
    pipe.load_ip_adapter(tmp_path / "other", weight_name="ip.safetensors")
    pipe.set_ip_adapter_scale(0.7)
    assert not settings.unchanged() and settings_digest(pipe.unet) != settings.digest


def test_exported_unet_reads_the_text_projected_outside():
    """A U-Net call's package takes its cross-attentions' keys and values of the text as inputs (projected once per
    context and weights, as torch.compile'd calls have them): the exported graph reads them, not the context."""
    from latentdiff import UNet2DConditionModel
    from latentdiff.compile_cache import _WithText
    from latentdiff.models.attention import TextProjections
    from latentdiff.models.unet import UNetConfig
    from tiny import TINY_UNET, randomized

    unet = randomized(UNet2DConditionModel(UNetConfig(**TINY_UNET)), 3).eval()
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor(500), torch.randn(2, 77, 32)
    with torch.no_grad():
        text = TextProjections.of(unet)
        pairs = text.projected(context)
        graph = torch.export.export(_WithText(unet, text.layers), ((x, t, context), {}, pairs)).module()
        torch.testing.assert_close(graph((x, t, context), {}, pairs), unet(x, t, context), atol=1e-5, rtol=0)
        other = text.projected(context * 2)
        assert (graph((x, t, context), {}, other) - unet(x, t, context)).abs().max() > 1e-3
        torch.testing.assert_close(graph((x, t, context), {}, other), unet(x, t, context * 2), atol=1e-5, rtol=0)
    assert all(layer.text_kv is None for layer in text.layers)  # (given for the call only)


def test_the_text_is_projected_again_only_when_the_context_or_a_projection_weight_changed():
    """TextProjections.projected reuses its buffers for the same context tensor through the same projection weights
    (a compiled loop's steps, also after a step callback), and projects again for another context, one changed in
    place, a weight changed in place (as a LoRA change writes them) or replaced, and for inference tensors (which
    keep no version to check)."""
    from latentdiff import UNet2DConditionModel
    from latentdiff.models.attention import TextProjections
    from latentdiff.models.unet import UNetConfig
    from tiny import TINY_UNET, randomized

    unet = randomized(UNet2DConditionModel(UNetConfig(**TINY_UNET)), 3).eval().requires_grad_(False)
    with torch.no_grad():
        text = TextProjections.of(unet)
    layer = text.layers[0]
    calls = []
    layer.to_k.register_forward_hook(lambda *_: calls.append(1))

    def check(context, projects: bool):
        before = len(calls)
        pairs = text.projected(context)
        assert len(calls) - before == int(projects)
        for l, (keys, values) in zip(text.layers, pairs):
            torch.testing.assert_close(keys, F.linear(context, l.to_k.weight, l.to_k.bias), atol=0, rtol=0)
            torch.testing.assert_close(values, F.linear(context, l.to_v.weight, l.to_v.bias), atol=0, rtol=0)

    context = torch.randn(2, 77, 32)
    with torch.no_grad():
        check(context, True)
        calls.clear()
        check(context, False)  # (the same tensor, unchanged: the buffers hold its projections)
        check(context.clone(), True)  # another tensor
        check(context, True)
        context.mul_(2)  # changed in place
        check(context, True)
        layer.to_v.weight.mul_(1.5)  # a weight changed in place
        check(context, True)
        check(context, False)
        layer.to_k.weight = torch.nn.Parameter(layer.to_k.weight * 0.5)  # a weight replaced
        check(context, True)
        check(context, False)
    with torch.inference_mode():
        frozen = torch.randn(2, 77, 32)
        check(frozen, True)
        check(frozen, True)


@needs_compiler
def test_a_package_is_compiled_once_then_loaded(tmp_path, monkeypatch):
    model = small_model()
    first = cached(model, tmp_path)
    with torch.no_grad():
        out = first(X)
        torch.testing.assert_close(out, model(X), atol=1e-5, rtol=0)
        path, = first.compiled_packages
        assert first.loaded_packages == [] and path.parent == tmp_path and path.name.startswith("Sequential-")
        assert json.loads(path.with_suffix(".json").read_text())["call"] == json.loads(call_key((X,), {}))
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # (no partial package)
        # nor the packaged files in inductor's cache folder (its shared library holds a copy of the weights)
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        with zipfile.ZipFile(path) as archive:
            packaged = {Path(n).name for n in archive.namelist() if "/aotinductor/" in n}
        assert any(n.endswith(".so") for n in packaged)
        assert [p for p in Path(cache_dir()).rglob("*") if p.name in packaged] == []
        torch.testing.assert_close(first(X + 1), model(X + 1), atol=1e-5, rtol=0)  # (the loaded package, kept)
        assert first.compiled_packages == [path]

        second = cached(small_model(), tmp_path)  # the same weights, in a new model: loaded, not compiled
        assert torch.equal(second(X), out) and second.compiled_packages == [] and second.loaded_packages == [path]

        # a file that cannot be loaded (cut short) is compiled again over, with a warning
        good = path.read_bytes()
        path.write_bytes(good[:len(good) // 2])
        rebuilt = []

        def compile_again(self, target, model, inputs):  # (the same compile as above, kept short here)
            rebuilt.append(target)
            target.write_bytes(good)
            return 0.0

        monkeypatch.setattr(CachedCompiledModel, "_compile", compile_again)
        third = cached(small_model(), tmp_path)
        with pytest.warns(UserWarning, match=rf"{path.name} could not be loaded .*compiling it again"):
            assert torch.equal(third(X), out)
        assert rebuilt == [path] and third.compiled_packages == [path]

        other = small_model(seed=1)  # other weights: another package
        assert cached(other, tmp_path).key(call_key((X,), {})) != first.key(call_key((X,), {}))
        assert first.key(call_key((X[:2],), {})) != first.key(call_key((X,), {}))  # another shape


def test_calls_it_cannot_keep_run_the_fallback(tmp_path):
    class Add(torch.nn.Module):
        def forward(self, x, y):
            return x + y

    made = []

    def fallback():
        made.append("torch.compile")
        return lambda *args: ("fallback", args)

    model_call = cached(Add(), tmp_path, fallback)
    assert model_call(X, X + 1)[0] == "fallback"  # gradients enabled
    with torch.no_grad():
        assert model_call(X, X)[0] == "fallback"  # one tensor twice
        assert model_call(X, 1.5j)[0] == "fallback"  # a value no key describes
    assert made == ["torch.compile"] and list(tmp_path.iterdir()) == []  # (made once, kept)

    class DataDependent(torch.nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    branching = cached(DataDependent(), tmp_path, lambda: lambda x: ("fallback", x))
    with torch.no_grad(), pytest.warns(UserWarning, match=r"DataDependent could not be compiled ahead of time "
                                                          r"for the call .*run through torch.compile instead"):
        assert branching(X)[0] == "fallback"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # (warned once a layout)
        assert branching(X)[0] == "fallback"
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".pt2"]


def test_compile_cache_dir_must_be_a_writable_folder(tmp_path):
    from latentdiff import LatentDiffusionImg2ImgPipeline, LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_pretrained("pipelines/tiny-shapes")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"that is a file, not a folder"):
        pipe.compile(cache_dir=tmp_path / "file")
    with pytest.raises(ValueError, match=r"cannot write there"):
        pipe.compile(cache_dir=tmp_path / "file" / "below")
    assert pipe._compile_options is None
    pipe.compile(cache_dir=tmp_path / "new" / "folder")
    assert (tmp_path / "new" / "folder").is_dir() and list((tmp_path / "new" / "folder").iterdir()) == []
    assert isinstance(pipe._unet_call(), CachedCompiledModel)
    img2img = LatentDiffusionImg2ImgPipeline.from_pipe(pipe)  # (compile()'s settings come along)
    assert (img2img._compile_options, img2img._compile_cache) == (pipe._compile_options, pipe._compile_cache)
    assert isinstance(img2img._unet_call(), CachedCompiledModel)
    pipe.disable_compile()
    assert pipe._unet_call() is pipe.unet


@needs_compiler
@pytest.mark.slow  # (one AOTInductor compile of the tiny-shapes U-Net: ~75 s on 2 cores; make test-slow)
def test_compiled_pipeline_is_kept_and_loaded_by_a_new_process(tmp_path):
    """pipe.compile(cache_dir=) end to end: the first process compiles the U-Net (its images as eager ones), a
    second finds the package, loads it in seconds and makes the same images bit for bit."""
    script = ("import sys, time, numpy as np, torch; from latentdiff import LatentDiffusionPipeline; "
              "pipe = LatentDiffusionPipeline.from_pretrained('pipelines/tiny-shapes'); "
              "run = lambda: pipe('a red circle', num_inference_steps=3, generator=torch.Generator().manual_seed(0), "
              "output_type='np', progress=False).images; eager = run(); "
              "pipe.compile(max_autotune=False, cache_dir=sys.argv[1]); start = time.perf_counter(); out = run(); "
              "seconds = time.perf_counter() - start; call = pipe._unet_call(); "
              "np.save(sys.argv[2], out); print(len(call.compiled_packages), len(call.loaded_packages), seconds, "
              "float(np.abs(out - eager).max()))")
    results = []
    for name in ("first", "second"):
        done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "cache"), str(tmp_path / f"{name}.npy")],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        compiled, loaded, seconds, error = done.stdout.split()[-4:]
        results.append((int(compiled), int(loaded), float(seconds), float(error)))
    (compiled, loaded, _, error), (compiled2, loaded2, seconds2, error2) = results
    assert (compiled, loaded, compiled2, loaded2) == (1, 0, 0, 1)
    note, = (tmp_path / "cache").glob("*.json")  # (the text's keys and values projected outside, once a loop)
    assert "text_projected_outside" in note.read_text()
    assert error < 1e-4 and error2 < 1e-4 and seconds2 < 30
    np.testing.assert_array_equal(np.load(tmp_path / "second.npy"), np.load(tmp_path / "first.npy"))


def test_packages_are_listed_and_those_never_usable_pruned(tmp_path, capsys):
    """packages() tells each package's note and whether this installation can use it; prune() (and `latentdiff
    compiled --prune`) deletes the stale ones, notes without a package and partial files of ended compiles."""
    from latentdiff.cli import main
    from latentdiff.compile_cache import _describe, packages, prune

    layout = call_key((torch.zeros(2, 4, 16, 16), torch.tensor(1.0)), {})
    for name, change in [("usable", None), ("source", ("source", "0" * 64)), ("torch", ("torch", "0.0")),
                         ("noted", None)]:
        path = tmp_path / f"Model-{name}.pt2"
        path.write_bytes(b"x" * 1000)
        if name != "noted":
            _describe(path, small_model(), layout, 12.5)
        if change is not None:
            note = json.loads(path.with_suffix(".json").read_text())
            if change[0] == "torch":
                note["machine"]["torch"] = change[1]
            else:
                note[change[0]] = change[1]
            path.with_suffix(".json").write_text(json.dumps(note))
    (tmp_path / "Model-orphan.json").write_text("{}")
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    dead, alive = (tmp_path / f".Model-x.{pid}.partial.pt2" for pid in (ended.pid, os.getpid()))
    for partial in (dead, alive):
        partial.write_bytes(b"")
    found = {entry["path"].stem.split("-")[1]: entry for entry in packages(tmp_path)}
    assert sorted(found) == ["noted", "source", "torch", "usable"]
    assert found["usable"]["stale"] is None and found["usable"]["compile_seconds"] == 12.5
    assert found["usable"]["bytes"] == 1000 and found["noted"]["stale"] is None  # (no note: it cannot tell)
    assert found["source"]["stale"] == "made by other latentdiff source code"
    assert found["torch"]["stale"].startswith("made by torch 0.0")
    assert main(["compiled", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "4 compiled models" in out and "Model-usable.pt2  Sequential" in out and "2x4x16x16 float32" in out
    assert "usable here" in out and "made by other latentdiff source code" in out
    assert main(["compiled", str(tmp_path), "--prune"]) == 0
    assert "removed 6 files" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [".Model-x.%d.partial.pt2" % os.getpid(), "Model-noted.pt2", "Model-usable.json", "Model-usable.pt2"])
    assert prune(tmp_path) == []
    assert main(["compiled", str(tmp_path / "missing")]) == 2
    assert "compiled-model folder not found" in capsys.readouterr().err
