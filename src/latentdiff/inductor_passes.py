"""Graph passes that pipe.compile() adds to inductor's CPU compilation (pipeline.inductor_settings).

OneDNNLinears: with frozen weights, inductor packs each float32 linear layer's weight for MKL (mkl._mkl_linear,
weight from torch.ops.mkl._mkl_reorder_linear_weight), and MKL's packed buffer is never smaller than 5.57 MiB,
whatever the layer: 5.57 MiB for a 96x96 weight of 36 KiB, 6.82 for 128x1024 (0.5 MiB), 14.6 for 1280x1280 (6.25
MiB; resident 1.31x the weight, oneDNN's packing 1.06x). The pass gives those layers oneDNN's packed linear instead
(mkldnn._linear_pointwise, the op inductor itself uses for bfloat16 and where MKL is missing) and drops the MKL
buffers and the plain weights no other node reads. Measured (benchmarks/compile_linears.py, AMD EPYC, 2 threads,
2026-12-06): SD 1.5's U-Net (8x8 latents) compiled with a peak RSS of 8339 instead of 8773 MiB, in 258 instead of
323 s, and ran as fast (0.309 vs 0.315 s); pipelines/tiny-shapes' U-Net alike in memory (most of MKL's buffers are
never touched) and in speed (whole pipeline, in-process A/B: paired ratios 1.005 and 1.03). It runs before
inductor's pattern passes, so oneDNN's fusions of a linear with what follows it apply as for any oneDNN linear.
"""
from __future__ import annotations

import functools

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files


class OneDNNLinears(CustomGraphPass):
    """Each mkl._mkl_linear(x, mkl_packed, weight, bias, batch_size) node (the op or its overload) of a frozen
    graph, whose weight is a constant of the graph, becomes mkldnn._linear_pointwise(x, onednn_packed, bias) with
    the weight packed by oneDNN for that batch size (the same product, up to float rounding); a weight packed once
    per batch size serves every node that shares it. Constants left without users are removed from the graph
    module, so their memory is freed."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        gm = graph.owning_module
        mkl = getattr(getattr(torch.ops, "mkl", None), "_mkl_linear", None)
        if gm is None or mkl is None or not torch.backends.mkldnn.is_available():
            return
        packed: dict[tuple[str, int], torch.fx.Node] = {}
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target not in (mkl, mkl.default) or len(node.args) != 5:
                continue
            x, mkl_weight, weight, bias, batch_size = node.args
            if weight.op != "get_attr" or not isinstance(batch_size, int):
                continue
            key = (weight.target, batch_size)
            with graph.inserting_before(node):
                if key not in packed:
                    name = _free_name(gm, "_onednn_linear_weight")
                    gm.register_buffer(name, torch.ops.mkldnn._reorder_linear_weight(_attr(gm, weight.target),
                                                                                     batch_size))
                    packed[key] = graph.get_attr(name)
                linear = graph.call_function(torch.ops.mkldnn._linear_pointwise.default,
                                             (x, packed[key], bias, "none", [], ""))
            linear.meta.update(node.meta)
            node.replace_all_uses_with(linear)
            graph.erase_node(node)
            for constant in (mkl_weight, weight):
                if constant.op == "get_attr" and not constant.users:
                    graph.erase_node(constant)
                    if not any(n.op == "get_attr" and n.target == constant.target for n in graph.nodes):
                        _drop_attr(gm, constant.target)
        graph.lint()

    def uuid(self) -> bytes:
        return get_hash_for_files((__file__,))


def _attr(gm: torch.nn.Module, target: str):
    return functools.reduce(getattr, target.split("."), gm)


def _drop_attr(gm: torch.nn.Module, target: str) -> None:
    *path, name = target.split(".")
    owner = functools.reduce(getattr, path, gm)
    if hasattr(owner, name):
        delattr(owner, name)


def _free_name(gm: torch.nn.Module, prefix: str) -> str:
    i = 0
    while hasattr(gm, f"{prefix}{i}"):
        i += 1
    return f"{prefix}{i}"
