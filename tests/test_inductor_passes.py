"""inductor_passes.OneDNNLinears: the MKL-packed linear layers of a frozen graph become oneDNN's, with the same
products, and the MKL buffers leave the graph module."""
import pytest
import torch
from torch import nn

from latentdiff.inductor_passes import OneDNNLinears

pytestmark = pytest.mark.skipif(
    not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")),
    reason="PyTorch built without oneDNN or MKL")

MKL_LINEAR = torch.ops.mkl._mkl_linear


def mkl_graph(weights: list[torch.Tensor], biases: list[torch.Tensor | None], order: list[int], batch: int):
    """A graph module as inductor's freezing leaves one: x -> linear(order[0]) -> ... by mkl._mkl_linear, each
    weight a constant with its MKL packing (a weight used twice has one packing, as inductor dedups them)."""
    gm = nn.Module()
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    for i, (w, b) in enumerate(zip(weights, biases)):
        gm.register_buffer(f"_frozen_w{i}", w)
        gm.register_buffer(f"_frozen_packed{i}", torch.ops.mkl._mkl_reorder_linear_weight(w, batch))
        if b is not None:
            gm.register_buffer(f"_frozen_b{i}", b)
    for i in order:
        args = [graph.get_attr(f"_frozen_packed{i}"), graph.get_attr(f"_frozen_w{i}")]
        bias = graph.get_attr(f"_frozen_b{i}") if biases[i] is not None else None
        x = graph.call_function(MKL_LINEAR, (x, *args, bias, batch))
        x = graph.call_function(torch.relu, (x,))
    graph.output(x)
    return torch.fx.GraphModule(gm, graph)


def test_mkl_linears_become_onednn_linears_with_the_same_products():
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(64, 48, generator=gen), torch.randn(48, 64, generator=gen)]
    biases = [torch.randn(64, generator=gen), None]
    gm = mkl_graph(weights, biases, order=[0, 1, 0], batch=32)  # (48 -> 64 -> 48 -> 64; weight 0 twice)
    x = torch.randn(32, 48, generator=gen)
    expected = gm(x)
    OneDNNLinears()(gm.graph)
    gm.recompile()
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert MKL_LINEAR not in targets and MKL_LINEAR.default not in targets
    assert targets.count(torch.ops.mkldnn._linear_pointwise.default) == 3
    # one oneDNN packing per weight; the MKL packings and the plain weights, which nothing reads now, are gone
    assert sorted(name for name, _ in gm.named_buffers()) == ["_frozen_b0", "_onednn_linear_weight0",
                                                              "_onednn_linear_weight1"]
    torch.testing.assert_close(gm(x), expected, atol=1e-5, rtol=1e-5)
    h = x
    for i in [0, 1, 0]:
        h = torch.relu(nn.functional.linear(h, weights[i], biases[i]))
    torch.testing.assert_close(gm(x), h, atol=1e-5, rtol=1e-5)


def test_a_weight_other_nodes_read_stays():
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(16, 16, generator=gen)
    gm = mkl_graph([weight], [None], order=[0], batch=4)
    graph = gm.graph
    out = next(n for n in graph.nodes if n.op == "output")
    linear = out.args[0]
    with graph.inserting_before(out):
        plain = next(n for n in graph.nodes if n.op == "get_attr" and n.target == "_frozen_w0")
        total = graph.call_function(torch.add, (linear, graph.call_function(torch.sum, (plain,))))
    out.args = (total,)
    gm.recompile()
    x = torch.randn(4, 16, generator=gen)
    expected = gm(x)
    OneDNNLinears()(gm.graph)
    gm.recompile()
    assert sorted(name for name, _ in gm.named_buffers()) == ["_frozen_w0", "_onednn_linear_weight0"]
    torch.testing.assert_close(gm(x), expected, atol=1e-5, rtol=1e-5)


def test_compiled_linears_run_on_onednn_under_the_pipelines_settings(monkeypatch):
    """torch.compile under pipeline.inductor_settings("cpu") runs the pass: the compiled module has no MKL-packed
    weight left and gives the eager outputs."""
    from latentdiff.pipeline import inductor_settings

    seen = []
    original = OneDNNLinears.__call__

    def spy(self, graph):
        original(self, graph)
        seen.append([n.target for n in graph.nodes if n.op == "call_function"])

    monkeypatch.setattr(OneDNNLinears, "__call__", spy)
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(24, 96), nn.GELU(), nn.Linear(96, 24)).eval()
    x = torch.randn(8, 24, generator=torch.Generator().manual_seed(2))
    compiled = torch.compile(model)
    with torch.no_grad(), inductor_settings("cpu", max_autotune=False), torch._inductor.config.patch(
            fx_graph_cache=False):  # (a cached graph would skip the passes)
        out = compiled(x)
    torch.testing.assert_close(out, model(x), atol=1e-5, rtol=1e-5)
    assert len(seen) == 1
    assert seen[0].count(torch.ops.mkldnn._linear_pointwise.default) == 2
    assert MKL_LINEAR not in seen[0] and MKL_LINEAR.default not in seen[0]
    torch._dynamo.reset()
