"""The backward kernels on the CPU: the gradients of every operation.

- ``backward_nhwc``: one kernel for the separable, depthwise and pointwise backward. The output
  pixels are cut into *chunks* of whole flattened output rows; each chunk is one task, which
  walks its pixels tile by tile:

  1. recompute the depthwise tile from x, as the forward does (``depthwise_row``): the
     intermediate ``A = mid_act(DW(x) + dw_bias)`` exists only as a tile x C*M buffer;
  2. ``gz = grad * act'(z)``, the mask read from the forward output y when the caller has it,
     else from ``z = A @ pw + bias`` recomputed with the forward's GEMM micro-kernel;
  3. ``d pw += A^T @ gz`` and ``d bias += colsum(gz)`` into the chunk's own partial sums (the
     micro-kernel in accumulate mode, over a transposed copy of A);
  4. ``gm = (gz @ pw^T) * mid_act'(A)`` (the micro-kernel again), ``d dw_bias += colsum(gm)``;
  5. the depthwise backward of gm: ``dx`` as the transposed correlation (each tap's product
     added into dx at the input pixel it read) and ``d dw += x * gm`` into the chunk's partial.

  The pointwise op is the same walk without a depthwise stage (A is x; gm is dx itself), the
  depthwise op without a pointwise stage (gm = grad * act'(y)).

- ``conv2d_grad_input_nhwc`` / ``conv2d_grad_weight_nhwc``: the standard convolution's
  gradients (a gather per input pixel, chunked partial sums for the weights).

Determinism: chunks are cut from the problem's size alone (``backward_plan``), never from the
thread count, and every sum runs in a fixed order: within a chunk in pixel order, then over the
chunks in chunk order (``combine_chunks``). No atomics. dx receives the taps of two neighbouring
chunks, which may read the same input rows: chunks then run in two phases (even chunks, then
odd ones), each chunk at least as tall as the kernel's reach, so no two chunks of one phase
touch the same row of dx. The result is the same bits at any thread count.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from numba import prange

from .. import _config
from .._spec import ConvSpec
from ._jit import NO_ACTIVATION, RELU6, helper, kernel
from .depthwise import depthwise_tile
from .layout import bias_vector
from .pointwise import GEMM_MR, gemm_panel_width, gemm_scratch, gemm_tile

# Flags of backward_nhwc, in the order of its ``flags`` tuple.
FLAG_FIELDS = ("has_dw", "has_pw", "have_y", "need_x", "need_dw", "need_pw", "need_db", "need_b")


@helper
def passes(v, code):  # pragma: no cover - compiled
    """act'(.) as 0/1, read from the activation's output (or input) value ``v``: relu passes
    where v > 0, relu6 where 0 < v < 6 (torch's convention at the kinks: 0). NaN: 0."""
    if code == NO_ACTIVATION:
        return True
    if code == RELU6:
        return v > 0 and v < 6
    return v > 0


@helper
def masked_copy(src, mask, code, dst, rows):  # pragma: no cover - compiled
    """dst[t, c] = src[t, c] where passes(mask[t, c]), else 0, for t < rows."""
    for t in range(rows):
        for c in range(src.shape[1]):
            dst[t, c] = src[t, c] if passes(mask[t, c], code) else 0


@helper
def mask_in_place(a, mask, code, rows):  # pragma: no cover - compiled
    for t in range(rows):
        for c in range(a.shape[1]):
            if not passes(mask[t, c], code):
                a[t, c] = 0


@helper
def add_colsum(src, rows, acc):  # pragma: no cover - compiled
    """acc[c] += src[t, c] for t < rows, in row order."""
    for t in range(rows):
        for c in range(src.shape[1]):
            acc[c] += src[t, c]


@helper
def transpose_into(a, rows, dst):  # pragma: no cover - compiled
    """dst[c, t] = a[t, c] for t < rows (dst: (a.shape[1], rows), C-contiguous)."""
    for c0 in range(0, a.shape[1], 16):
        for t in range(rows):
            for c in range(c0, min(a.shape[1], c0 + 16)):
                dst[c, t] = a[t, c]


@helper
def depthwise_backward_tile(
    x, dwk, gm, p0, rows, oh, ow, geo, gx, gdw, need_x, need_dw
):  # pragma: no cover - compiled
    """The depthwise backward of gm (rows x C*M) at output pixels p0..p0+rows-1: every tap
    inside the image adds gm * w into gx at the input pixel it read (``need_x``) and x * gm
    into gdw[tap] (``need_dw``); pixels in order, taps in order."""
    kh, kw, sh, sw, dil_h, dil_w, pt, pl, mult = geo
    H = x.shape[1]
    W = x.shape[2]
    C = x.shape[3]
    for t in range(rows):
        p = p0 + t
        j = p % ow
        r = p // ow
        n = r // oh
        i = r - n * oh
        for m in range(kh):
            ih = i * sh - pt + m * dil_h
            if ih < 0 or ih >= H:
                continue
            for q in range(kw):
                iw = j * sw - pl + q * dil_w
                if iw < 0 or iw >= W:
                    continue
                tap = m * kw + q
                if mult == 1:
                    if need_x:
                        for c in range(C):
                            gx[n, ih, iw, c] += gm[t, c] * dwk[m, q, c]
                    if need_dw:
                        for c in range(C):
                            gdw[tap, c] += x[n, ih, iw, c] * gm[t, c]
                else:
                    for c in range(C):
                        base = c * mult
                        if need_x:
                            s = gm[t, base] * dwk[m, q, base]
                            for u in range(1, mult):
                                s += gm[t, base + u] * dwk[m, q, base + u]
                            gx[n, ih, iw, c] += s
                        if need_dw:
                            xv = x[n, ih, iw, c]
                            for u in range(mult):
                                gdw[tap, base + u] += xv * gm[t, base + u]


@helper
def backward_chunk(
    k,
    x,
    dwk,
    db,
    pw,
    pwt,
    b,
    g2,
    y2,
    gx,
    gpw,
    gdw,
    gdb,
    gb,
    zeros,
    geo,
    mid_act,
    act,
    flags,
    plan,
    oh,
    ow,
):  # pragma: no cover - compiled
    """Chunk ``k`` of backward_nhwc (see the module docstring), tile by tile."""
    has_dw, has_pw, have_y, need_x, need_dw, need_pw, need_db, need_b = flags
    rows_per_chunk, _, _, tile, kc = plan
    P = g2.shape[0]
    CM = pw.shape[0]
    CO = pw.shape[1]
    dt = g2.dtype
    p_lo = k * rows_per_chunk * ow
    p_hi = min(P, p_lo + rows_per_chunk * ow)
    need_gm = need_x or need_dw or need_db
    # the mask of the final activation needs z (recomputed) when y is not given
    need_z = has_pw and act != NO_ACTIVATION and not have_y
    need_a = has_pw and (need_pw or need_z or (need_gm and mid_act != NO_ACTIVATION))
    need_a = need_a or (not has_pw and mid_act != NO_ACTIVATION and not have_y)
    abuf = np.empty((tile, CM), dtype=dt)
    gmbuf = np.empty((tile, CM), dtype=dt)
    gzbuf = np.empty((tile, CO), dtype=dt)
    zbuf = np.empty((tile if need_z else 1, CO), dtype=dt)
    at_flat = np.empty(CM * tile if need_pw else 1, dtype=dt)
    pk, at, part = gemm_scratch(kc, max(tile, CM), g2)
    x2 = x.reshape(-1, x.shape[3])
    p = p_lo
    while p < p_hi:
        p1 = min(p_hi, p + tile)
        T = p1 - p
        if has_dw:
            if need_a:
                depthwise_tile(x, dwk, p, p1, oh, ow, geo, db, mid_act, abuf)
            a = abuf[:T]
        else:
            a = x2[p:p1]
        gm = gmbuf[:T]
        if has_pw:
            gz = g2[p:p1]
            if act != NO_ACTIVATION:
                if need_z:
                    gemm_tile(a, T, pw, b, zbuf, 0, CO, NO_ACTIVATION, False, pk, at, part, 0, 0)
                    masked_copy(gz, zbuf, act, gzbuf, T)
                else:
                    masked_copy(gz, y2[p:p1], act, gzbuf, T)
                gz = gzbuf[:T]
            if need_b:
                add_colsum(gz, T, gb[k])
            if need_pw:
                a_t = at_flat[: CM * T].reshape(CM, T)
                transpose_into(a, T, a_t)
                gemm_tile(a_t, CM, gz, zeros, gpw[k], 0, CO, NO_ACTIVATION, True, pk, at, part,
                          0, 0)  # fmt: skip
            if need_gm:
                if not has_dw:
                    gm = gx.reshape(-1, CM)[p:p1]  # pointwise: gm is dx itself
                gemm_tile(gz, T, pwt, zeros, gm, 0, CM, NO_ACTIVATION, False, pk, at, part, 0, 0)
                if has_dw and mid_act != NO_ACTIVATION:
                    mask_in_place(gm, a, mid_act, T)
        elif need_gm:  # depthwise alone: gm = grad * act'(y), y given or recomputed
            if mid_act == NO_ACTIVATION:
                gm[:] = g2[p:p1]
            elif have_y:
                masked_copy(g2[p:p1], y2[p:p1], mid_act, gm, T)
            else:
                masked_copy(g2[p:p1], a, mid_act, gm, T)
        if need_db:
            add_colsum(gm, T, gdb[k])
        if has_dw and (need_x or need_dw):
            depthwise_backward_tile(x, dwk, gm, p, T, oh, ow, geo, gx, gdw[k], need_x, need_dw)
        p = p1


def backward_nhwc(
    x,
    dwk,
    db,
    pw,
    pwt,
    b,
    g2,
    y2,
    gx,
    gpw,
    gdw,
    gdb,
    gb,
    zeros,
    geo,
    mid_act,
    act,
    flags,
    plan,
    oh,
    ow,
):  # pragma: no cover - compiled
    """The separable / depthwise / pointwise backward (module docstring), chunks in parallel.

    x: (N,H,W,C) NHWC; dwk: (KH,KW,C*M); db: the depthwise bias (C*M); pw: (C*M, C_out),
    pwt: its transpose, C-contiguous; b: the final bias padded to the panel width; g2, y2:
    grad and the forward output as (pixels, channels) (y2 unread unless ``have_y``); gx: dx,
    NHWC, zeroed where the depthwise stage scatters into it; gpw, gdw, gdb, gb: per-chunk
    partial sums, zeroed; zeros: a zero bias for the GEMMs; plan: ``backward_plan``.
    """
    _, nchunks, phases, _, _ = plan
    for phase in range(phases):
        count = (nchunks - phase + phases - 1) // phases
        for u in prange(count):
            backward_chunk(
                u * phases + phase, x, dwk, db, pw, pwt, b, g2, y2, gx, gpw, gdw, gdb, gb,
                zeros, geo, mid_act, act, flags, plan, oh, ow,
            )  # fmt: skip


BACKWARD = kernel(backward_nhwc, None)


def combine_chunks(parts, out):  # pragma: no cover - compiled
    """out[r, c] = parts[0, r, c] + parts[1, r, c] + ... in chunk order (rows in parallel)."""
    K = parts.shape[0]
    for r in prange(parts.shape[1]):
        for c in range(parts.shape[2]):
            s = parts[0, r, c]
            for k in range(1, K):
                s += parts[k, r, c]
            out[r, c] = s


COMBINE = kernel(combine_chunks, None)


# --------------------------------------------------------------------------------------------
# the standard convolution


def conv2d_grad_input_nhwc(gy, w, gx, geo):  # pragma: no cover - compiled
    """gx[n, r, s, c] = sum over the taps (m, q) that read input pixel (r, s) from output
    pixel (i, j) of gy[n, i, j, :] . w[m, q, c, :]: a gather, one input row per task."""
    kh, kw, sh, sw, dil_h, dil_w, pt, pl, _ = geo
    N, H, W, C = gx.shape
    OH = gy.shape[1]
    OW = gy.shape[2]
    CO = gy.shape[3]
    for t in prange(N * H):
        n = t // H
        r = t - n * H
        for s in range(W):
            for c in range(C):
                gx[n, r, s, c] = 0
            for m in range(kh):
                a = r + pt - m * dil_h
                if a < 0 or a % sh != 0 or a // sh >= OH:
                    continue
                i = a // sh
                for q in range(kw):
                    e = s + pl - q * dil_w
                    if e < 0 or e % sw != 0 or e // sw >= OW:
                        continue
                    j = e // sw
                    for c in range(C):
                        acc = gx[n, r, s, c]
                        for o in range(CO):
                            acc += gy[n, i, j, o] * w[m, q, c, o]
                        gx[n, r, s, c] = acc


CONV2D_GRAD_INPUT = kernel(conv2d_grad_input_nhwc, None)


def conv2d_grad_weight_nhwc(x, gy, gw, gb, geo, rows_per_chunk):  # pragma: no cover - compiled
    """gw[k, m, q, c, o] = sum over chunk k's output pixels of x[tap's input pixel, c] *
    gy[pixel, o] (gw: per-chunk partials (K, KH, KW, C, C_out), zeroed); gb[k, o] the chunk's
    sum of gy. Pixels in order within a chunk."""
    kh, kw, sh, sw, dil_h, dil_w, pt, pl, _ = geo
    _, H, W, C = x.shape
    N, OH, OW, CO = gy.shape
    nchunks = gw.shape[0]
    for k in prange(nchunks):
        r0 = k * rows_per_chunk
        r1 = min(N * OH, r0 + rows_per_chunk)
        for r in range(r0, r1):
            n = r // OH
            i = r - n * OH
            for j in range(OW):
                for o in range(CO):
                    gb[k, o] += gy[n, i, j, o]
                for m in range(kh):
                    ih = i * sh - pt + m * dil_h
                    if ih < 0 or ih >= H:
                        continue
                    for q in range(kw):
                        iw = j * sw - pl + q * dil_w
                        if iw < 0 or iw >= W:
                            continue
                        for c in range(C):
                            xv = x[n, ih, iw, c]
                            for o in range(CO):
                                gw[k, m, q, c, o] += xv * gy[n, i, j, o]


CONV2D_GRAD_WEIGHT = kernel(conv2d_grad_weight_nhwc, None)


# --------------------------------------------------------------------------------------------
# plans and argument builders


def backward_plan(
    rows: int, oh: int, ow: int, reach: int, partial_bytes: int, tile_row_bytes: int
) -> tuple[int, int, int, int, int]:
    """(rows per chunk, chunks, phases, tile, kc) of a backward call, from the problem alone.

    rows: output rows over the batch (N * OH); reach: the fewest output rows a chunk needs so
    that chunks two apart never touch the same input row (``reach_rows``); partial_bytes: one
    chunk's partial sums; tile_row_bytes: the scratch one tile pixel needs. The tunables are
    read here (a test that patches them gets a new plan); the arithmetic is memoised.
    """
    return _backward_plan(
        rows, oh, ow, reach, partial_bytes, tile_row_bytes, _config.BACKWARD_CHUNKS,
        _config.BACKWARD_MIN_PIXELS, _config.BACKWARD_PARTIAL_BYTES, _config.CPU_TILE_BYTES,
        _config.CPU_TILE_MAX_PIXELS, _config.CPU_GEMM_KC,
    )  # fmt: skip


@functools.lru_cache(maxsize=1024)
def _backward_plan(
    rows, oh, ow, reach, partial_bytes, tile_row_bytes, max_chunks, min_pixels, budget,
    tile_bytes, tile_max, kc,
):  # fmt: skip
    """Chunks: up to ``max_chunks``, each with at least ``min_pixels`` pixels and their
    partial sums within ``budget`` bytes; whole images where that leaves several (no two
    chunks share an input row: one phase), else runs of rows in two phases. Tiles: the
    scratch of one within ``tile_bytes``, at most ``tile_max`` pixels."""
    pixels = rows * ow
    limit = max(1, budget // max(1, partial_bytes))
    nchunks = min(max_chunks, limit, max(1, pixels // min_pixels))
    nchunks = max(1, min(nchunks, rows // reach))
    per = -(-rows // nchunks)
    if per >= oh and nchunks > 1:
        per = -(-per // oh) * oh  # whole images
    nchunks = -(-rows // per)
    phases = 1 if nchunks == 1 or per % oh == 0 else 2
    fit = tile_bytes // max(1, tile_row_bytes)
    tile = max(GEMM_MR, min(tile_max, fit) // GEMM_MR * GEMM_MR)
    return per, nchunks, phases, tile, kc


def reach_rows(spec: ConvSpec) -> int:
    """The fewest output rows per chunk for two-phase chunks (see backward_plan)."""
    return max(1, (spec.kh - 1) * spec.dilation_h // spec.stride_h)


def zeros_like_parts(nchunks: int, shape: tuple[int, ...], dtype: np.dtype, need: bool):
    return np.zeros((nchunks, *shape) if need else (1,) * (len(shape) + 1), dtype)


def combine(parts: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The chunks' partial sums added in chunk order, as an array of ``shape``."""
    if parts.shape[0] == 1:
        return parts[0].reshape(shape)
    k = parts.shape[0]
    p3 = parts.reshape(k, parts.shape[1], -1) if parts.ndim >= 3 else parts.reshape(k, 1, -1)
    out = np.empty(p3.shape[1:], parts.dtype)
    if _config.use_parallel(parts.size):
        with _config.call_guard():
            COMBINE.parallel(p3, out)
    else:
        COMBINE.serial(p3, out)
    return out.reshape(shape)


def gemm_backward_args(
    spec: ConvSpec, x, g, y, dwk, pw, biases, need: dict[str, bool], dt: np.dtype
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """(arguments of backward_nhwc, its outputs by slot) for one separable, depthwise or
    pointwise backward on NHWC, C-contiguous, writable x, g (and y, or None).

    ``need`` says which gradients to compute, by the kernel's slots: "x", "dw", "pw", "db"
    (the depthwise stage's bias: dw_bias, or the depthwise op's bias) and "b" (the pointwise
    stage's bias); every slot present, False where the op has no such stage. The outputs:
    "x" (dx, NHWC) and the other slots' per-chunk partial sums (``combine`` adds them up); a
    slot not needed holds a dummy.
    """
    op = spec.op
    has_dw, has_pw = op != "pointwise", op != "depthwise"
    sz = dt.itemsize
    cm, co = spec.c_mid, spec.c_out
    nr = gemm_panel_width(sz)
    if has_pw:
        mid_act, act = int(spec.mid_activation), int(spec.activation)
    else:  # the depthwise op: its activation is the stage's own
        mid_act, act = int(spec.activation), NO_ACTIVATION
    db = bias_vector(biases[0], cm, dt) if has_dw else np.zeros(1, dt)
    if not has_dw:
        dwk = np.zeros((1, 1, 1), dt)
    if not has_pw:  # never read: a single output channel keeps the scratch small
        pw, co = np.zeros((cm, 1), dt), 1
    pwt = np.ascontiguousarray(pw.T)
    b = bias_vector(biases[-1] if has_pw else None, co, dt, nr)
    # the plan counts every partial sum, needed or not: the chunks (and so the bits of every
    # gradient) do not depend on which gradients are asked for
    partial = cm * co + spec.kh * spec.kw * cm + cm + co
    tile_row = (3 * cm + 3 * co) * sz
    rows = spec.n * spec.out_h
    plan = backward_plan(rows, spec.out_h, spec.out_w, reach_rows(spec), partial * sz, tile_row)
    nchunks = plan[1]
    parts = {
        "pw": zeros_like_parts(nchunks, (cm, co), dt, need["pw"]),
        "dw": zeros_like_parts(nchunks, (spec.kh * spec.kw, cm), dt, need["dw"]),
        "db": zeros_like_parts(nchunks, (cm,), dt, need["db"]),
        "b": zeros_like_parts(nchunks, (co,), dt, need["b"]),
    }
    shape = (spec.n, spec.h, spec.w, spec.c_in)
    if not need["x"]:
        gx = np.zeros((1, 1, 1, cm), dt)
    else:  # the depthwise stage adds into dx; the pointwise op's GEMM writes it whole
        gx = np.zeros(shape, dt) if has_dw else np.empty(shape, dt)
    g2 = g.reshape(spec.pixels, g.shape[3])
    y2 = y.reshape(spec.pixels, y.shape[3]) if y is not None else g2[:0]
    flags = (has_dw, has_pw, y is not None, need["x"], need["dw"], need["pw"], need["db"],
             need["b"])  # fmt: skip
    zeros = np.zeros(-(-max(cm, co) // nr) * nr, dt)
    args = (x, dwk, db, pw, pwt, b, g2, y2, gx, parts["pw"], parts["dw"], parts["db"],
            parts["b"], zeros, spec.geometry, mid_act, act, flags, plan, spec.out_h,
            spec.out_w)  # fmt: skip
    return args, {"x": gx, **parts}


def _launch(k: Any, work: int, *args: Any) -> None:
    if _config.use_parallel(work):
        with _config.call_guard():
            k.parallel(*args)
    else:
        k.serial(*args)


def _empty_batch(spec: ConvSpec, need: dict[str, bool], shapes: dict, dt: np.dtype) -> dict:
    """N = 0: an empty dx, zero weight and bias gradients (sums over no pixel)."""
    found = {k: np.zeros(shapes[k], dt) for k, v in need.items() if v and k != "x"}
    if need.get("x"):
        found["x"] = np.empty((0, spec.h, spec.w, spec.c_in), dt)
    return found


def gemm_grads(spec: ConvSpec, x, g, y, weights, biases, need, dt: np.dtype) -> dict[str, Any]:
    """The separable / depthwise / pointwise gradients ``need`` asks for (slots, as in
    grad.SLOTS): dx NHWC, weights in the kernels' shapes; x, g, y NHWC, C-contiguous, writable."""
    op = spec.op
    dwk = weights[0] if op != "pointwise" else None
    pw = weights[-1] if op != "depthwise" else None
    want = {s: bool(need.get(s, False)) for s in ("x", "dw", "pw", "db", "b")}
    shapes = {"pw": (spec.c_mid, spec.c_out), "dw": (spec.kh, spec.kw, spec.c_mid),
              "db": (spec.c_mid,), "b": (spec.c_out,)}  # fmt: skip
    if spec.n == 0:
        return _empty_batch(spec, want, shapes, dt)
    if not any(want.values()):
        return {}
    args, outs = gemm_backward_args(spec, x, g, y, dwk, pw, biases, want, dt)
    _launch(BACKWARD, 3 * spec.macs, *args)
    found = {"x": outs["x"]} if want["x"] else {}
    for slot, shape in shapes.items():
        if want[slot]:
            found[slot] = combine(outs[slot], shape)
    return found


def conv2d_grads(spec: ConvSpec, x, g, y, w, bias, need, dt: np.dtype) -> dict[str, Any]:
    """The conv2d gradients ``need`` asks for ("x", "w", "b"), as gemm_grads."""
    from .conv2d import CONV2D

    want = {s: bool(need.get(s, False)) for s in ("x", "w", "b")}
    shapes = {"w": tuple(w.shape), "b": (spec.c_out,)}
    if spec.n == 0:
        return _empty_batch(spec, want, shapes, dt)
    gy = g
    if spec.activation != 0 and any(want.values()):
        if y is None:  # the forward again, for the activation's mask
            y = np.empty(spec.out_nhwc, dt)
            par = _config.use_parallel(spec.macs)
            _launch(CONV2D, spec.macs, *CONV2D.args(spec, x, (w,), (bias,), y, par))
        if y.dtype == np.bool_:
            mask = y
        else:
            mask = (y > 0) & (y < 6) if spec.activation == RELU6 else y > 0
        gy = np.where(mask, g, np.zeros((), dt))
    found = {}
    if want["x"]:
        gx = np.empty(x.shape, dt)
        _launch(CONV2D_GRAD_INPUT, spec.macs, gy, w, gx, spec.geometry)
        found["x"] = gx
    if want["w"]:
        rows = spec.n * spec.out_h
        per, nchunks = backward_plan(rows, spec.out_h, spec.out_w, 1, w.size * dt.itemsize, 1)[:2]
        gw = np.zeros((nchunks, *w.shape), dt)
        gb = np.zeros((nchunks, spec.c_out), dt)
        _launch(CONV2D_GRAD_WEIGHT, spec.macs, x, gy, gw, gb, spec.geometry, per)
        found["w"] = combine(gw, shapes["w"])
        if want["b"]:
            found["b"] = combine(gb, shapes["b"])
    elif want["b"]:
        found["b"] = gy.reshape(-1, spec.c_out).sum(axis=0, dtype=dt)
    return found
