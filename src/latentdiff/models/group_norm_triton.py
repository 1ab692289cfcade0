"""The Triton kernels of group_norm.py (imported only on a CUDA device: importing Triton costs time). The three take
the same parameters, in the same order (each ignores those it does not need), so that group_norm.py launches them
alike."""
import triton
import triton.language as tl


@triton.jit
def _load(x_ptr, shift_ptr, n, g, p0, PER_SLICE, P, CG, s_n, s_c, s_p, s_t,
          BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, HAS_SHIFT: tl.constexpr, start):
    """One [BLOCK_C, BLOCK_P] tile of group g of sample n (float32, its mask): channels g*CG.., pixels from
    p0 + start, cut at the slice's and the image's end; masked elements read 0. With a shift, x + shift[n, c] (row
    n at n * s_t: s_t = 0 gives every sample row 0) rounded to x's dtype, as the unfused add would give."""
    cs = tl.arange(0, BLOCK_C)
    ps = p0 + start + tl.arange(0, BLOCK_P)
    mask = (cs[:, None] < CG) & (ps[None, :] < P) & (ps[None, :] < p0 + PER_SLICE)
    ch = g * CG + cs
    v = tl.load(x_ptr + n * s_n + ch[:, None] * s_c + ps[None, :] * s_p, mask=mask, other=0.0)
    if HAS_SHIFT:
        shift = tl.load(shift_ptr + n * s_t + ch, mask=cs < CG, other=0.0)
        v = tl.where(mask, (v + shift[:, None]).to(v.dtype), 0.0)
    return v.to(tl.float32), mask


@triton.jit
def _slice_stats(x_ptr, shift_ptr, n, g, p0, PER_SLICE, P, CG, s_n, s_c, s_p, s_t,
                 BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, HAS_SHIFT: tl.constexpr):
    """Mean, sum of squared deviations (M2) and count of one slice of one group, in two passes over the slice."""
    total = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    count = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    for start in range(0, PER_SLICE, BLOCK_P):
        v, mask = _load(x_ptr, shift_ptr, n, g, p0, PER_SLICE, P, CG, s_n, s_c, s_p, s_t,
                        BLOCK_C, BLOCK_P, HAS_SHIFT, start)
        total += v
        count += mask.to(tl.float32)
    cnt = tl.sum(tl.sum(count, axis=1), axis=0)
    mean = tl.sum(tl.sum(total, axis=1), axis=0) / tl.maximum(cnt, 1.0)
    dev = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    for start in range(0, PER_SLICE, BLOCK_P):
        v, mask = _load(x_ptr, shift_ptr, n, g, p0, PER_SLICE, P, CG, s_n, s_c, s_p, s_t,
                        BLOCK_C, BLOCK_P, HAS_SHIFT, start)
        d = tl.where(mask, v - mean, 0.0)
        dev += d * d
    return mean, tl.sum(tl.sum(dev, axis=1), axis=0), cnt


@triton.jit
def _normalise(x_ptr, shift_ptr, w_ptr, b_ptr, out_ptr, mean, rstd, n, g, p0, PER_SLICE, P, CG, s_n, s_c, s_p, s_t,
               o_c, o_p, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, HAS_SHIFT: tl.constexpr, SILU: tl.constexpr):
    """Write one slice of one group: (x - mean) * rstd * w + b, then SiLU, at the output's channel and pixel strides
    (o_c, o_p: its layout may differ from x's; its batch stride is x's, C * P)."""
    cs = tl.arange(0, BLOCK_C)
    ch = g * CG + cs
    w = tl.load(w_ptr + ch, mask=cs < CG, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + ch, mask=cs < CG, other=0.0).to(tl.float32)
    scale = (w * rstd)[:, None]
    bias = (b - mean * w * rstd)[:, None]
    for start in range(0, PER_SLICE, BLOCK_P):
        v, mask = _load(x_ptr, shift_ptr, n, g, p0, PER_SLICE, P, CG, s_n, s_c, s_p, s_t,
                        BLOCK_C, BLOCK_P, HAS_SHIFT, start)
        y = v * scale + bias
        if SILU:
            y = y * tl.sigmoid(y)
        ps = p0 + start + tl.arange(0, BLOCK_P)
        tl.store(out_ptr + n * s_n + ch[:, None] * o_c + ps[None, :] * o_p,
                 y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def norm_kernel(x_ptr, shift_ptr, w_ptr, b_ptr, out_ptr, stats_ptr, eps, P, CG, GROUPS, s_n, s_c, s_p, s_t, o_c, o_p,
                PER_SLICE, SPLIT, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr,
                HAS_SHIFT: tl.constexpr, SILU: tl.constexpr):
    """A whole group in one program (one launch for the norm): its statistics, then its output."""
    ng = tl.program_id(0)
    n, g = ng // GROUPS, ng % GROUPS
    mean, m2, cnt = _slice_stats(x_ptr, shift_ptr, n, g, 0, P, P, CG, s_n, s_c, s_p, s_t,
                                 BLOCK_C, BLOCK_P, HAS_SHIFT)
    rstd = 1.0 / tl.sqrt(m2 / cnt + eps)
    _normalise(x_ptr, shift_ptr, w_ptr, b_ptr, out_ptr, mean, rstd, n, g, 0, P, P, CG, s_n, s_c, s_p, s_t, o_c, o_p,
               BLOCK_C, BLOCK_P, HAS_SHIFT, SILU)


@triton.jit
def stats_kernel(x_ptr, shift_ptr, w_ptr, b_ptr, out_ptr, stats_ptr, eps, P, CG, GROUPS, s_n, s_c, s_p, s_t, o_c, o_p,
                 PER_SLICE, SPLIT, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr,
                 HAS_SHIFT: tl.constexpr, SILU: tl.constexpr):
    """A group split into SPLIT slices, one program each, first pass: each slice's mean, M2 and count."""
    ng, s = tl.program_id(0), tl.program_id(1)
    n, g = ng // GROUPS, ng % GROUPS
    mean, m2, cnt = _slice_stats(x_ptr, shift_ptr, n, g, s * PER_SLICE, PER_SLICE, P, CG, s_n, s_c, s_p, s_t,
                                 BLOCK_C, BLOCK_P, HAS_SHIFT)
    slot = ng * SPLIT + s
    rows = tl.num_programs(0) * SPLIT
    tl.store(stats_ptr + slot, mean)
    tl.store(stats_ptr + rows + slot, m2)
    tl.store(stats_ptr + 2 * rows + slot, cnt)


@triton.jit
def apply_kernel(x_ptr, shift_ptr, w_ptr, b_ptr, out_ptr, stats_ptr, eps, P, CG, GROUPS, s_n, s_c, s_p, s_t, o_c, o_p,
                 PER_SLICE, SPLIT, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr,
                 HAS_SHIFT: tl.constexpr, SILU: tl.constexpr):
    """Second pass: combine the group's slice statistics (Chan et al.'s pairwise formula), normalise this slice."""
    ng, s = tl.program_id(0), tl.program_id(1)
    n, g = ng // GROUPS, ng % GROUPS
    rows = tl.num_programs(0) * SPLIT
    slots = tl.arange(0, BLOCK_S)
    ok = slots < SPLIT
    means = tl.load(stats_ptr + ng * SPLIT + slots, mask=ok, other=0.0)
    m2s = tl.load(stats_ptr + rows + ng * SPLIT + slots, mask=ok, other=0.0)
    cnts = tl.load(stats_ptr + 2 * rows + ng * SPLIT + slots, mask=ok, other=0.0)
    cnt = tl.sum(cnts, axis=0)
    mean = tl.sum(cnts * means, axis=0) / cnt
    d = means - mean
    var = (tl.sum(m2s, axis=0) + tl.sum(cnts * d * d, axis=0)) / cnt
    rstd = 1.0 / tl.sqrt(var + eps)
    _normalise(x_ptr, shift_ptr, w_ptr, b_ptr, out_ptr, mean, rstd, n, g, s * PER_SLICE, PER_SLICE, P, CG,
               s_n, s_c, s_p, s_t, o_c, o_p, BLOCK_C, BLOCK_P, HAS_SHIFT, SILU)
