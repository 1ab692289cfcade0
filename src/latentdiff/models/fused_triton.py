"""The Triton kernels of fused.py (imported only on a CUDA device: importing Triton costs time)."""
import triton
import triton.language as tl


@triton.jit
def add_layer_norm_kernel(x_ptr, y_ptr, w_ptr, b_ptr, sum_ptr, out_ptr, eps, ROWS, D, ROWS_PER: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    """ROWS_PER rows of [ROWS, D] per program: s = x + y (rounded to x's dtype, as the unfused add gives), then
    LayerNorm(s) * w + b with float32 statistics; both written."""
    cols = tl.arange(0, BLOCK_D)
    in_row = cols < D
    w = tl.load(w_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
    for i in range(ROWS_PER):
        row = tl.program_id(0) * ROWS_PER + i
        mask = in_row & (row < ROWS)
        x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0)
        y = tl.load(y_ptr + row * D + cols, mask=mask, other=0.0)
        s = (x.to(tl.float32) + y.to(tl.float32)).to(x.dtype)
        tl.store(sum_ptr + row * D + cols, s, mask=mask)
        v = s.to(tl.float32)
        mean = tl.sum(v, axis=0) / D
        d = tl.where(in_row, v - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / D + eps)
        tl.store(out_ptr + row * D + cols, (d * rstd * w + b).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def geglu_kernel(h_ptr, out_ptr, DH, BLOCK: tl.constexpr):
    """Row program_id(0), columns from program_id(1) * BLOCK of out = value * gelu(gate), where a row of h is
    [value | gate] (DH each): the exact (erf) GELU in float32, rounded to h's dtype before the product as the
    unfused gelu's output is."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < DH
    value = tl.load(h_ptr + row * 2 * DH + cols, mask=mask, other=0.0)
    gate = tl.load(h_ptr + row * 2 * DH + DH + cols, mask=mask, other=0.0).to(tl.float32)
    gelu = (0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476))).to(value.dtype)
    out = value.to(tl.float32) * gelu.to(tl.float32)
    tl.store(out_ptr + row * DH + cols, out.to(out_ptr.dtype.element_ty), mask=mask)
