"""CPU-specific checks: exact worked examples, argument spellings, the GEMM blocking knobs, the
32-byte vector build, the cost model. The geometry/dtype/layout sweep is the case table
(tests/cases.py, run by tests/test_ops.py)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import numpy as np
import pytest
from cases import Case
from helpers import (
    ALL_OPS,
    D_EX,
    P_EX,
    X_EX,
    Y_EX,
    Z_EX,
    assert_close,
    bitwise_equal,
    check_against_reference,
    lib_fn,
    ref_fn,
    x_shape,
)
from reference import ref_cost, ref_separable

import numba_dsconv as nd

# ---------------------------------------------------------------------------------------------
# the worked example, exactly (integer-valued, so every dtype must give the exact numbers)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_worked_example_exact(dtype):
    x, d, p = X_EX.astype(dtype), D_EX.astype(dtype), P_EX.astype(dtype)
    y = nd.depthwise(x, d, device="cpu")
    assert y.shape == (2, 2, 3) and y.dtype == dtype
    np.testing.assert_array_equal(y, Y_EX)
    z = nd.separable(x, d, p, device="cpu")
    assert z.shape == (2, 2, 2) and z.dtype == dtype
    np.testing.assert_array_equal(z, Z_EX)
    np.testing.assert_array_equal(nd.pointwise(Y_EX.astype(dtype), p, device="cpu"), Z_EX)
    w = (D_EX[..., None] * P_EX[None, None]).astype(dtype)
    np.testing.assert_array_equal(nd.conv2d(x, w, device="cpu"), Z_EX)
    z = nd.separable(
        x,
        d,
        p,
        dw_bias=np.array([-140.0, 0.0, 0.0], dtype),
        mid_activation="relu6",
        bias=np.array([3.0, -15.0], dtype),
        activation="relu",
        device="cpu",
    )
    np.testing.assert_array_equal(z, [[[0, 0], [3, 3]], [[3, 3], [3, 3]]])


COST_INT_FIELDS = (
    "standard_macs",
    "depthwise_macs",
    "pointwise_macs",
    "separable_macs",
    "standard_params",
    "separable_params",
)


def test_cost_worked_example():
    c = nd.cost((4, 4, 3), 3, 2)
    assert tuple(c.output_shape) == (2, 2, 2)
    assert (c.standard_macs, c.depthwise_macs, c.pointwise_macs) == (216, 108, 24)
    assert c.separable_macs == 132
    assert (c.standard_params, c.separable_params) == (54, 33)
    for field in COST_INT_FIELDS:
        assert isinstance(getattr(c, field), int), field
    assert float(c.mac_ratio) == pytest.approx(132 / 216)
    assert float(c.param_ratio) == pytest.approx(33 / 54)


# ---------------------------------------------------------------------------------------------
# dtypes x layouts x batchedness


@pytest.mark.parametrize(("xdt", "bdt"), [(np.float32, np.float64), (np.float64, np.float32)])
@pytest.mark.parametrize("op", ALL_OPS)
def test_bias_dtype_does_not_change_result_dtype(op, xdt, bdt, rng):
    case = Case(op, n=1, h=5, w=5, xdtype=xdt, biases=True, padding="same")
    x, weights, kw = case.make(rng)
    kw.update({k: kw[k].astype(bdt) for k in ("bias", "dw_bias") if k in kw})
    expected = ref_fn(op)(x, *weights, **kw)
    y = lib_fn(op)(x, *weights, device="cpu", **kw)
    assert y.dtype == xdt
    assert_close(y, expected, xdt, case.reduction_len)


def test_mid_activation_is_applied_before_pointwise(rng):
    # A negative depthwise intermediate killed by mid relu changes the result; a post relu can't
    # fake that (this pins the order: mid_activation(depthwise + dw_bias), then pointwise).
    x = np.ones((1, 1, 2), np.float64)
    dw = np.array([[[1.0, -1.0]]])
    pw = np.array([[1.0], [1.0]])
    assert nd.separable(x, dw, pw, device="cpu")[0, 0, 0] == 0.0
    assert nd.separable(x, dw, pw, mid_activation="relu", device="cpu")[0, 0, 0] == 1.0
    out = nd.separable(x, dw, pw, dw_bias=np.array([0.0, 3.0]), mid_activation="relu6")
    assert out[0, 0, 0] == 3.0
    np.testing.assert_array_equal(
        out, ref_separable(x, dw, pw, dw_bias=np.array([0.0, 3.0]), mid_activation="relu6")
    )


# ---------------------------------------------------------------------------------------------
# weight spellings, empty batch, default device


def test_weight_spellings_agree(rng):
    x = rng.standard_normal((2, 6, 5, 3))
    dw4 = rng.standard_normal((3, 3, 3, 1))
    pw2 = rng.standard_normal((3, 4))
    a = nd.depthwise(x, dw4, padding="same", device="cpu")
    b = nd.depthwise(x, dw4[..., 0], padding="same", device="cpu")
    np.testing.assert_array_equal(a, b)
    a = nd.pointwise(x, pw2, device="cpu")
    b = nd.pointwise(x, pw2.reshape(1, 1, 3, 4), device="cpu")
    np.testing.assert_array_equal(a, b)
    a = nd.separable(x, dw4, pw2.reshape(1, 1, 3, 4), padding="same", device="cpu")
    b = nd.separable(x, dw4[..., 0], pw2, padding="same", device="cpu")
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, ref_separable(x, dw4, pw2, padding="same"), rtol=1e-12)


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("op", ALL_OPS)
def test_empty_batch(op, dtype, layout, rng):
    mult = 2 if op in ("depthwise", "separable") else 1
    case = Case(op, n=0, h=7, w=6, c=3, mult=mult, c_out=5, xdtype=dtype, layout=layout,
                biases=True, stride=2, padding="same")  # fmt: skip
    x, weights, kw = case.make(rng)
    y = lib_fn(op)(x, *weights, device="cpu", **kw)
    c_res = 5 if op != "depthwise" else 6
    oh, ow = (4, 3) if op != "pointwise" else (7, 6)
    assert y.shape == x_shape(0, oh, ow, c_res, layout)
    assert y.dtype == dtype


@pytest.mark.parametrize("op", ALL_OPS)
def test_default_device_is_cpu(op, rng):
    x, weights, kw = Case(op, n=1, h=5, w=5, biases=True).make(rng)
    a = lib_fn(op)(x, *weights, **kw)
    b = lib_fn(op)(x, *weights, device="cpu", **kw)
    np.testing.assert_array_equal(a, b)


def test_padding_spellings_agree(rng):
    # 'same' at stride 2 on 7x8 with a 4x3 kernel is ((1, 2), (0, 1)) by the TF rule:
    # rows: out 4, total 3*2 + 3 + 1 - 7 = 3; columns: out 4, total 3*2 + 2 + 1 - 8 = 1.
    x = rng.standard_normal((1, 7, 8, 2))
    dw = rng.standard_normal((4, 3, 2))
    pw = rng.standard_normal((2, 3))
    a = nd.separable(x, dw, pw, stride=2, padding="same", device="cpu")
    b = nd.separable(x, dw, pw, stride=2, padding=((1, 2), (0, 1)), device="cpu")
    np.testing.assert_array_equal(a, b)
    a = nd.depthwise(x, dw, padding=(1, 2), device="cpu")
    b = nd.depthwise(x, dw, padding=((1, 1), (2, 2)), device="cpu")
    np.testing.assert_array_equal(a, b)
    a = nd.depthwise(x, dw, padding=1, stride=(2, 2), dilation=(1, 1), device="cpu")
    b = nd.depthwise(x, dw, padding=(1, 1), stride=2, dilation=1, device="cpu")
    np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# cost


COST_CASES = [
    ((4, 4, 3), 3, 2, {}),
    ((224, 224, 3), 3, 32, {"stride": 2, "padding": "same"}),
    ((112, 112, 32), 3, 64, {"padding": "same"}),
    ((7, 9, 5), (3, 5), 4, {"padding": ((0, 2), (1, 0)), "dilation": (2, 1)}),
    ((8, 8, 4), 3, 6, {"padding": 1, "depth_multiplier": 2}),
    ((9, 9, 2), (2, 3), 3, {"stride": (1, 2), "padding": (1, 2), "dilation": 2}),
    ((5, 5, 3), 1, 7, {"stride": 3}),
    ((2, 4, 4, 3), 3, 2, {}),  # batched: MACs scale with N, params do not
    ((3, 10, 10, 8), 3, 16, {"stride": 2, "padding": "same", "depth_multiplier": 3}),
]


@pytest.mark.parametrize(("shape", "k", "c_out", "kw"), COST_CASES, ids=str)
def test_cost_matches_reference(shape, k, c_out, kw):
    got = nd.cost(shape, k, c_out, **kw)
    want = ref_cost(shape, k, c_out, **kw)
    assert tuple(got.output_shape) == want.output_shape
    for field in COST_INT_FIELDS:
        assert getattr(got, field) == getattr(want, field), field
    assert float(got.mac_ratio) == pytest.approx(want.mac_ratio, rel=1e-12)
    assert float(got.param_ratio) == pytest.approx(want.param_ratio, rel=1e-12)


def test_cost_output_shape_matches_separable(rng):
    x = rng.standard_normal((2, 9, 7, 3)).astype(np.float32)
    dw = rng.standard_normal((3, 2, 3, 2)).astype(np.float32)
    pw = rng.standard_normal((6, 5)).astype(np.float32)
    geo = {"stride": (2, 1), "padding": "same", "dilation": (1, 2)}
    y = nd.separable(x, dw, pw, device="cpu", **geo)
    c = nd.cost(x.shape, (3, 2), 5, depth_multiplier=2, **geo)
    assert tuple(c.output_shape) == y.shape


@pytest.mark.parametrize(
    ("xdt", "dwdt", "pwdt"),
    [(np.float32, np.float64, np.float32), (np.float32, np.float32, np.float64)],
)
def test_separable_mixed_weight_dtypes(xdt, dwdt, pwdt, rng):
    x = rng.standard_normal((2, 7, 6, 3)).astype(xdt)
    dw = rng.standard_normal((3, 3, 3, 2)).astype(dwdt)
    pw = rng.standard_normal((6, 4)).astype(pwdt)
    y = nd.separable(x, dw, pw, padding="same", device="cpu")
    assert_close(y, ref_separable(x, dw, pw, padding="same"), np.float64, 9 * 6)


# ---------------------------------------------------------------------------------------------
# the GEMM micro-kernel's blocking: reduction blocks (partial sums between them), panels of
# output channels cut by C_out, pixel groups cut by the tile, channel blocks split across tasks


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("kc", [1, 8, 256])
@pytest.mark.parametrize(("op", "c", "mult", "c_out"), [
    ("pointwise", 37, 1, 70), ("pointwise", 16, 1, 1), ("separable", 13, 3, 33),
    ("separable", 20, 1, 64), ("conv2d", 9, 1, 64),
])  # fmt: skip
def test_gemm_blocking(op, c, mult, c_out, kc, parallel, monkeypatch, rng):
    """Forward and gradients against float64 with the reduction cut into blocks of kc (1, 8:
    partial sums between blocks, in the backward's GEMMs too; 256: one block) and tiles of 12
    pixels; conv2d with C_out 64 on its direct path (AVX-512) where kc is 2 or more (kc 1
    divided by zero there)."""
    from test_grad import check_grads

    config = pytest.importorskip("numba_dsconv._config")
    monkeypatch.setattr(config, "CPU_GEMM_KC", kc)
    monkeypatch.setattr(config, "CPU_TILE_MAX_PIXELS", 12)
    if parallel:
        monkeypatch.setattr(config, "SERIAL_MAX_MACS", 0)
    for dtype in (np.float32, np.float64):
        case = Case(op, n=2, h=5, w=7, c=c, mult=mult, c_out=c_out, xdtype=dtype, biases=True,
                    padding="same", activation="relu6")  # fmt: skip
        x, weights, kw = case.make(rng)
        check_against_reference(op, x, weights, case.reduction_len, **kw)
        check_grads(case, "cpu", rng, with_output=False)


@pytest.mark.parametrize("op", ["pointwise", "separable", "conv2d"])
def test_reduction_blocks_change_no_bits(op, monkeypatch, rng):
    """The reduction cut into blocks of 8 (partial sums stored and reloaded between them) or
    run in one: the same bits, forward and every gradient, in parallel (each sum runs in
    reduction order through the partial sums)."""
    from test_grad import grad_fn, grad_problem

    monkeypatch.setattr(nd._config, "SERIAL_MAX_MACS", 0)
    case = Case(op, n=2, h=6, w=7, c=40, c_out=70, xdtype=np.float32, biases=True,
                padding="same", activation="relu6")  # fmt: skip
    x, weights, kwargs, grad = grad_problem(case, rng)
    runs = []
    for kc in (8, 2048):
        monkeypatch.setattr(nd._config, "CPU_GEMM_KC", kc)
        out = lib_fn(op)(x, *weights, device="cpu", **kwargs)
        grads = grad_fn(op)(grad, x, *weights, device="cpu", **kwargs)
        runs.append([out, *(g for g in grads if g is not None)])
    for a, b in zip(*runs, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(("pixels", "c_red", "c_out", "taps", "wide_split", "whole_tile"), [
    (12544, 32, 64, 9, (252, 64), None), (6272, 256, 256, 9, None, None),
    (1568, 512, 512, 9, None, None), (392, 1024, 1024, 9, (49, 1024), 98),
    (392, 1024, 1024, 0, None, None), (1568, 576, 96, 9, None, None),
    (49, 1024, 1024, 9, None, None), (100, 3, 5, 9, None, None),
])  # fmt: skip
def test_gemm_split_keeps_tile_and_weights_in_l2(
    pixels, c_red, c_out, taps, wide_split, whole_tile
):
    """The task split (``_gemm_split``, 2 threads, 512 KiB tile budget, kc 2048): whole row
    groups and whole panels, the A tile within the budget less half of a reduction block's
    weights (the tile, the next task's prefetched input and the weight block share L2), and
    with AVX-512 the splits measured best: N=1 layer 1 in 50 tiles of 252 pixels, not 56 of 224
    (0.4 % shorter on paper: the fewest tasks within SPLIT_SLACK) nor 49 of 256; N=8 layer 7
    in tiles of one 7x7 image (two overran L2), and in two without the prefetch (conv2d)."""
    from numba_dsconv.cpu import pointwise as pwm

    sz, threads, budget, cap, kc = 4, 2, 512 * 1024, 256, 2048
    nr = pwm.gemm_panel_width(sz)
    slack = pwm.SPLIT_SLACK
    tile, cblock = pwm._gemm_split(
        pixels, c_red, c_out, sz, taps, True, threads, budget, cap, kc, slack
    )
    assert cblock % nr == 0 and 0 < cblock <= -(-c_out // nr) * nr
    assert any(tile % m == 0 for m in pwm.GEMM_MRS)
    # a block of the wide path is kc / 2 rows of a pair of panels, of the narrow kc of one
    block = (min(2 * c_red, kc) if pwm.WIDE else min(c_red, kc)) * nr * sz
    assert tile <= max(pwm.GEMM_MR, min(cap, (budget - block // 2) // (c_red * sz)))
    if pwm.WIDE and wide_split is not None:
        assert (tile, cblock) == wide_split
    # without the prefetch (conv2d: kc 0) the whole budget holds the tile
    whole, _ = pwm._gemm_split(pixels, c_red, c_out, sz, taps, True, threads, budget, cap, 0, slack)
    assert whole <= max(pwm.GEMM_MR, min(cap, budget // (c_red * sz)))
    if pwm.WIDE and whole_tile is not None:
        assert whole == whole_tile


@pytest.mark.parametrize("threads", [1, 2, 3, 4, 6, 8, 16])
def test_gemm_split_in_pairs_of_panels(threads):
    """conv2d's direct path writes two panels at a time: with ``panel_group`` 2 every channel
    block is whole pairs, whatever the thread count (a split of 5 panels wrote a panel past its
    block: another task's channels, or past the output)."""
    from numba_dsconv.cpu import pointwise as pwm

    for sz in (4, 8):
        nr = pwm.gemm_panel_width(sz)
        shapes = [(196, 576, 320), (98, 144, 192), (9, 36, 2 * nr), (28, 90, 4 * nr),
                  (6272, 288, 10 * nr)]  # fmt: skip
        for pixels, c_red, c_out in shapes:
            tile, cblock = pwm._gemm_split(
                pixels, c_red, c_out, sz, 1, True, threads, 512 * 1024, 768, 0, 0.01, 2
            )
            assert cblock % (2 * nr) == 0 and 0 < cblock <= c_out, (pixels, c_out, cblock)
            assert tile > 0


@pytest.mark.parametrize("h", [1, 3, 9])  # 1 to 18 tasks of 8 pixels
@pytest.mark.parametrize("c_out", [40, 200])  # one channel block, or several where few pixels
def test_separable_worker_runs_give_the_serial_bits(h, c_out, monkeypatch, request, rng):
    """The fused kernel's tasks in one contiguous run per worker (each prefetching only its
    own next task's input): fewer tasks than workers, as many, and more, split unevenly; at 1
    and 2 threads the same bits as the serial build (each output's sums run in reduction
    order whatever the tile), the thread count read per call."""
    import numba

    request.addfinalizer(functools.partial(numba.set_num_threads, numba.get_num_threads()))
    x = rng.standard_normal((1, h, 8, 24)).astype(np.float32)
    dw = rng.standard_normal((3, 3, 24)).astype(np.float32)
    pw = rng.standard_normal((24, c_out)).astype(np.float32)
    kw = dict(padding=1, mid_activation="relu6", bias=rng.standard_normal(c_out).astype(np.float32))
    monkeypatch.setattr(nd._config, "SERIAL_MAX_MACS", 10**12)
    serial = nd.separable(x, dw, pw, **kw)
    monkeypatch.setattr(nd._config, "SERIAL_MAX_MACS", 0)
    monkeypatch.setattr(nd._config, "CPU_TILE_MAX_PIXELS", 8)
    for threads in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
        numba.set_num_threads(threads)
        assert bitwise_equal(nd.separable(x, dw, pw, **kw), serial), threads


@pytest.mark.parametrize(("h", "workers"), [(3, 5), (7, 3), (7, 1), (1, 2)])
def test_separable_kernel_covers_every_task_at_any_worker_count(h, workers, rng):
    """The kernel's runs (one per worker, contiguous) with a hand-made split: more workers than
    tasks (3 tasks on 5: empty runs), 7 tasks on 3 (uneven), 7 on 1, 1 on 2; every task run
    once: the serial build's bits."""
    from numba_dsconv._spec import make_spec
    from numba_dsconv.cpu.separable import SEPARABLE

    x = rng.standard_normal((1, h, 8, 24)).astype(np.float32)
    dw = rng.standard_normal((3, 3, 24)).astype(np.float32)
    pw = rng.standard_normal((24, 40)).astype(np.float32)
    spec = make_spec("separable", x_shape=x.shape, layout="NHWC", kernel=(3, 3),
                     c_in_kernel=24, multiplier=1, c_out=40, padding=1)  # fmt: skip
    dt = np.dtype(np.float32)
    serial = np.full(spec.out_nhwc, np.nan, np.float32)
    SEPARABLE.serial(*SEPARABLE.args(spec, dt, False)(x, (dw, pw), (None, None), serial))
    args = list(SEPARABLE.args(spec, dt, True)(x, (dw, pw), (None, None), serial.copy()))
    out = args[6] = np.full(spec.out_nhwc, np.nan, np.float32)
    tile, cblock, kc, _ = args[10]
    args[10] = (8, 64, kc, workers)  # tasks of 8 pixels, every channel
    assert -(-spec.pixels // 8) == h  # one task per output row of 8 pixels
    SEPARABLE.parallel(*args)
    assert bitwise_equal(out, serial)


def test_gemm_split_caps_the_reduction_block(monkeypatch):
    """``gemm_split``'s kc: CPU_GEMM_KC, at most the reduction (twice it with the wide block,
    whose pairs take kc / 2): one block for every reduction up to the cap, no larger scratch."""
    from numba_dsconv._spec import make_spec
    from numba_dsconv.cpu import pointwise as pwm

    spec = make_spec("pointwise", x_shape=(2, 7, 7, 100), layout="NHWC", kernel=(1, 1),
                     c_in_kernel=100, multiplier=1, c_out=64)  # fmt: skip
    monkeypatch.setattr(nd._config, "CPU_GEMM_KC", 2048)
    assert pwm.gemm_split(spec, 100, 0, 4, True)[2] == (200 if pwm.WIDE else 100)
    monkeypatch.setattr(nd._config, "CPU_GEMM_KC", 96)
    assert pwm.gemm_split(spec, 100, 0, 4, True)[2] == 96


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize(("h", "w", "c"), [(7, 7, 21), (3, 7, 16), (7, 8, 21), (1, 1, 7)])
def test_gemm_row_group_heights(h, w, c, parallel, monkeypatch, rng):
    """The micro-kernel's block heights (8 and 7 rows with AVX-512, 6 with AVX2): each GEMM
    takes the one computing the fewest rows (49 pixels: 7-row groups, 56: 8-row ones). Every
    op running the GEMM, forward and backward (whose d pw GEMM has C*M rows), with whole, short
    and single-row last groups, against the float64 reference."""
    from test_grad import check_grads

    from numba_dsconv.cpu.pointwise import GEMM_MRS, row_group

    for rows in range(1, 100):
        fits = [-(-rows // m) * m for m in GEMM_MRS]
        assert row_group(rows) == GEMM_MRS[fits.index(min(fits))]
    if parallel:
        monkeypatch.setattr(nd._config, "SERIAL_MAX_MACS", 0)
    for op in ("pointwise", "separable", "conv2d"):
        for dtype in (np.float32, np.float64):
            case = Case(op, n=1, h=h, w=w, c=c, c_out=33, xdtype=dtype, biases=True,
                        padding="same", activation="relu6")  # fmt: skip
            x, weights, kw = case.make(rng)
            check_against_reference(op, x, weights, case.reduction_len, **kw)
            check_grads(case, "cpu", rng, with_output=False)


# (the kernel, where its panels and its output sit in the kernel's arguments)
_PANELS_AT = {"pointwise": ("POINTWISE", 2, 4), "separable": ("SEPARABLE", 4, 6),
              "conv2d": ("CONV2D", 2, 4)}  # fmt: skip


def _conv_geometry(kernel, stride, dilation, padding, rng):
    """x (2, 6, 7, 3), its zero-padded copy, the output size and the kernels' geometry tuple."""
    n, h, w, c = 2, 6, 7, 3
    (kh, kw), (sh, sw), (dh, dw), (pt, pb, pl, pr) = kernel, stride, dilation, padding
    x = rng.standard_normal((n, h, w, c)).astype(np.float32)
    oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    ow = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
    padded = np.zeros((n, h + pt + pb, w + pl + pr, c), np.float32)
    padded[:, pt : pt + h, pl : pl + w] = x
    return x, padded, oh, ow, (kh, kw, sh, sw, dh, dw, pt, pl, 0)


@pytest.mark.parametrize(
    ("kernel", "stride", "dilation", "padding"),
    [((3, 3), (1, 1), (1, 1), (1, 1, 1, 1)), ((3, 3), (2, 2), (1, 1), (0, 1, 0, 1)),
     ((2, 5), (1, 2), (2, 1), (1, 0, 2, 3)), ((3, 3), (1, 1), (1, 2), (2, 2, 2, 2)),
     ((1, 4), (3, 1), (1, 1), (0, 0, 3, 0))],
)  # fmt: skip
@pytest.mark.parametrize("slab", [1, 2, 4, 0])  # 0: every tap
def test_im2col_slab_gathers_each_tap_or_zero(kernel, stride, dilation, padding, slab, rng):
    """conv2d's gather, against the formula: every tap of every pixel, runs of taps in one
    kernel row copied at once or tap by tap (dilated, cut by the padding, a slab starting or
    ending inside a kernel row), zeros on the padding; pixels spanning rows and images."""
    from numba_dsconv.cpu.conv2d import im2col_slab

    x, padded, oh, ow, geo = _conv_geometry(kernel, stride, dilation, padding, rng)
    n, h, w, c = x.shape
    kh, kw, sh, sw, dh, dw, pt = geo[:7]
    taps = kh * kw
    slab = slab or taps
    p0, p1 = 3, n * oh * ow - 2  # not from the first pixel, nor to the last
    for t0 in range(0, taps, slab):
        t1 = min(taps, t0 + slab)
        buf = np.full((p1 - p0, (t1 - t0) * c), np.nan, np.float32)
        im2col_slab(x, p0, p1, oh, ow, geo, kw, t0, t1, buf)
        want = np.empty_like(buf)
        for p in range(p0, p1):
            b, rem = divmod(p, oh * ow)
            i, j = divmod(rem, ow)
            for t in range(t0, t1):
                m, q = divmod(t, kw)
                want[p - p0, (t - t0) * c : (t - t0 + 1) * c] = padded[
                    b, i * sh + m * dh, j * sw + q * dw
                ]
        np.testing.assert_array_equal(buf, want)


@pytest.mark.parametrize(
    ("kernel", "stride", "dilation", "padding"),
    [((3, 3), (1, 1), (1, 1), (1, 1, 1, 1)), ((3, 3), (2, 2), (1, 1), (0, 1, 0, 1)),
     ((2, 5), (1, 2), (2, 1), (1, 0, 2, 3)), ((1, 1), (2, 2), (1, 1), (0, 0, 0, 0))],
)  # fmt: skip
@pytest.mark.parametrize(("p0", "p1"), [(0, 5), (3, -2), (0, 0)])  # 0: to the last pixel
def test_conv_band_holds_each_tap_at_its_offset(kernel, stride, dilation, padding, p0, p1, rng):
    """conv2d's direct path reads tap (m, q) of pixel p at byte offset offs[p - p0] + m * sm +
    q * sq of the band: the padded input there, against the formula, for pixels within a row,
    spanning rows and spanning images; ``input_span`` covers the rows of x the band copies."""
    from numba_dsconv.cpu.conv2d import conv_band, input_span

    x, padded, oh, ow, geo = _conv_geometry(kernel, stride, dilation, padding, rng)
    n, h, w, c = x.shape
    kh, kw, sh, sw, dh, dw, pt = geo[:7]
    p1 = p1 if p1 > 0 else n * oh * ow + p1
    band, offs, sm, sq = conv_band(x, p0, p1, oh, ow, geo, x)
    flat = band.reshape(-1)
    assert offs.shape == (p1 - p0,)
    rows_read = set()
    for p in range(p0, p1):
        b, rem = divmod(p, oh * ow)
        i, j = divmod(rem, ow)
        for m in range(kh):
            for q in range(kw):
                at = (offs[p - p0] + m * sm + q * sq) // 4
                want = padded[b, i * sh + m * dh, j * sw + q * dw]
                np.testing.assert_array_equal(flat[at : at + c], want)
                if 0 <= i * sh + m * dh - pt < h:
                    rows_read.add(b * h + i * sh + m * dh - pt)
    start, length = input_span(x, p0, p1, oh, ow, geo)
    row = w * c * 4
    assert (start - x.ctypes.data) // row == min(rows_read)
    assert length // row == max(rows_read) - min(rows_read) + 1


@pytest.mark.parametrize(
    ("stride", "padding", "dilation", "direct"),
    [(1, 1, 1, True), (2, "same", 1, True), ((1, 2**33), ((1, 1), (0, 0)), 1, True),
     (42949673, ((0, 2**31 + 1), (0, 2**31 + 1)), 1, False),
     (1, ((1, 1), (2**20, 2**20)), (1, 2**20), False)],
)  # fmt: skip
def test_conv2d_direct_path_only_where_its_band_stays_small(stride, padding, dilation, direct):
    """conv2d's direct path copies each task's input rows padded (``conv_band``): only where
    the padded rows stay near the input's size. Padding far past the image (or a dilation that
    spreads the taps) takes im2col, which gathers only the taps: a band of 2**31 columns was
    "array is too big" inside the kernel (found by test_hostile once C_out 16 took the direct
    path); a stride past the image with one output column is harmless. Either way the float64
    reference."""
    from numba_dsconv import api
    from numba_dsconv.cpu import conv2d
    from numba_dsconv.cpu.pointwise import WIDE

    if not WIDE:
        pytest.skip("the direct path needs AVX-512's wide register block")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 24, 18, 16)).astype(np.float32)  # tiles whose 6-row groups pay
    wt = rng.standard_normal((3, 3, 16, 16)).astype(np.float32)
    kw = dict(stride=stride, padding=padding, dilation=dilation)
    spec = api.plan(nd.conv2d, x, (wt,), kw).spec
    build = conv2d.CONV2D.args(spec, np.dtype(np.float32), True)
    assert build(x, (wt,), (None,), np.empty(spec.out_nhwc, np.float32))[-1] is direct
    assert_close(nd.conv2d(x, wt, **kw), ref_fn("conv2d")(x, wt, **kw), np.float32, 9 * 16)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("count", [1, 2, 9])
def test_dx3x3_pair_adds_the_bits_of_two_one_vector_passes(count, stride, dtype, rng):
    """``backward.dx3x3_pair`` (dx two channel vectors per pass, against 4K aliasing) adds into
    dx the bits ``dw3x3_backward_interior`` adds one vector at a time: the rolling sums at
    stride 1, the pending column at stride 2, the columns still pending at the row's end."""
    from numba import njit

    from numba_dsconv.cpu._simd import VEC_BYTES, address
    from numba_dsconv.cpu.backward import dw3x3_backward_interior, dx3x3_pair

    dt = np.dtype(dtype)
    lanes = VEC_BYTES // dt.itemsize
    c = 2 * lanes
    width = stride * count + 3  # the windows and the columns pending after the last
    dx = rng.standard_normal((3, width, c)).astype(dt)
    w = rng.standard_normal((9, c)).astype(dt)
    gm = rng.standard_normal((count, c)).astype(dt)

    @njit
    def run(dx, w, gm, pair):
        sz = dx.itemsize
        row = dx.strides[0]
        tap = c * sz
        pix = stride * tap
        if pair:
            dx3x3_pair(address(dx), row, 0, tap, pix, address(w), tap, address(gm),
                       gm.strides[0], count, dx.dtype)  # fmt: skip
        else:
            for v in range(2):
                vb = v * lanes * sz
                dw3x3_backward_interior(0, address(dx), row, vb, tap, pix, address(w) + vb, 0,
                                        tap, address(gm) + vb, gm.strides[0], count, True,
                                        False, dx.dtype)  # fmt: skip

    one, two = dx.copy(), dx.copy()
    run(one, w, gm, False)
    run(two, w, gm, True)
    assert not np.array_equal(one, dx)
    assert one.tobytes() == two.tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kc", [0, 48, 24, 16])  # 0: the default (every tap in one block)
@pytest.mark.parametrize("panels", [6, 5, 1.5, 2.75])
@pytest.mark.parametrize("kernel", [(3, 3), (2, 5)])
def test_conv2d_direct_path_matches_im2col_bitwise(kernel, panels, kc, dtype, monkeypatch):
    """conv2d's direct path (``conv_wide``: no im2col, AVX-512) sums in the order of the
    im2col path: the same bits, for reduction blocks of all taps, of several whole taps (kc 48:
    KCW 24 holds 4 taps of 5 channels, 9 taps go in 3 blocks of 3, a 2 x 5 kernel's 10 in
    blocks of 4, 4, 2; kc 24: blocks of 2 taps), blocks that start inside a kernel row and
    cross into the next (the tap loops step the row and column: 3 x 3 in blocks of 2 taps from
    tap 2, 2 x 5 in 4s from tap 4), and of a tap's channels (kc 16: C_in 20 in chunks of 7, 7,
    6); a 3 x 3 kernel at stride (1, 2) and a 2 x 5 one with dilation (1, 2) (a tap's
    columns two apart in the band); weights packed per task and by the caller; tiles
    that cross images; channel blocks of whole pairs of panels where single panels would split
    the work more evenly (the split made for 2 threads whatever the machine; run on the threads
    there are); C_out of whole pairs (6 panels), of pairs and an odd panel (5), and with a
    panel cut by C_out (1.5: one whole panel and a cut one after no pair, 2.75) on the tap
    block, whose masked stores write nothing past C_out (sentinels after the output); the
    float64 reference."""
    from numba_dsconv.cpu import conv2d, pointwise
    from numba_dsconv.cpu.pointwise import WIDE, no_packed, packed_weights

    if not WIDE:
        pytest.skip("the direct path needs AVX-512's wide register block")
    from numba_dsconv import _config
    from numba_dsconv._spec import Activation, make_spec

    dt = np.dtype(dtype)
    rng = np.random.default_rng(5)
    # 6 panels: for 2 threads in blocks of 3 panels but for ``panel_group`` 2
    n, h, w, c_out = 4, 9, 8, int(panels * pointwise.gemm_panel_width(dt.itemsize))
    c = 5 if kc != 16 else 20
    if kc:
        monkeypatch.setattr(_config, "CPU_GEMM_KC", kc)
    # tiles of up to 48 pixels (3 x 16): many, across images
    monkeypatch.setattr(_config, "CPU_TILE_MAX_PIXELS", 16)
    monkeypatch.setattr(_config, "thread_count", lambda: 2)  # the split gemm_split makes
    x = rng.standard_normal((n, h, w, c)).astype(dt)
    wt = rng.standard_normal((*kernel, c, c_out)).astype(dt)
    bias = rng.standard_normal(c_out).astype(dt)
    geo = dict(padding="same", stride=(1, 2)) if kernel == (3, 3) else dict(
        padding="same", dilation=(1, 2))  # fmt: skip
    spec = make_spec(
        "conv2d", x_shape=x.shape, layout="NHWC", kernel=kernel, c_in_kernel=c, multiplier=1,
        c_out=c_out, activation=Activation.RELU6, **geo,
    )  # fmt: skip
    k = conv2d.CONV2D
    size = int(np.prod(spec.out_nhwc))
    buffer = np.full(size + 64, np.nan, dt)  # the output, then sentinels
    out = buffer[:size].reshape(spec.out_nhwc)
    direct = list(k.args(spec, dt, True)(x, (wt,), (bias,), out))
    assert direct[-1] is True
    tile, cblock, _ = direct[7]
    assert cblock % (2 * pointwise.gemm_panel_width(dt.itemsize)) == 0
    image = spec.out_h * spec.out_w
    assert any(p // image != (min(p + tile, spec.pixels) - 1) // image  # a tile across images
               for p in range(0, spec.pixels, tile))  # fmt: skip
    packed = list(direct)
    packed[2] = packed_weights(direct[1], False)
    packed[4] = np.empty_like(direct[4])
    im2col = list(direct)
    im2col[2], im2col[4], im2col[8], im2col[9] = no_packed(dt), np.empty_like(direct[4]), 2, False
    assert direct[2].shape[0] == 0  # each task packs its own
    for args in (direct, packed, im2col):
        k.parallel(*args)
    assert direct[4].tobytes() == packed[4].tobytes() == im2col[4].tobytes()
    assert np.isnan(buffer[size:]).all()
    expected = ref_fn("conv2d")(x, wt, bias=bias, activation="relu6", **geo)
    assert_close(direct[4], expected, dt, kernel[0] * kernel[1] * c)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("op", "slab_taps"), [("pointwise", 0), ("separable", 0),
                                               ("conv2d", 9), ("conv2d", 2),
                                               ("conv2d", 0)])  # fmt: skip
def test_weights_packed_once_per_call(op, slab_taps, dtype, monkeypatch, request, rng):
    """Where each thread runs several pixel blocks and would pack more weights than its L2
    holds (``packs_once``; L2 made small here, at most 2 threads, 256-pixel tiles at most),
    the GEMM kernels pack their weights into panels once per call: the same bits as packing
    per task, and the float64 reference. conv2d on im2col (the direct path turned off) with
    one slab of all 9 taps and with slabs of 2 (the last of 1), each slab reading its rows of
    the panels, and (slab_taps 0) on its direct path where the CPU has AVX-512; C_out 70: a
    panel cut by C_out after one pair of panels (float32) or two (float64)."""
    import numba

    from numba_dsconv import _config
    from numba_dsconv._spec import Activation, make_spec
    from numba_dsconv.cpu import conv2d, pointwise, separable
    from numba_dsconv.cpu.pointwise import no_packed, packs_once

    dt = np.dtype(dtype)
    n, h, w, c, c_out = 2, 23, 29, 5, 70
    request.addfinalizer(functools.partial(numba.set_num_threads, numba.get_num_threads()))
    numba.set_num_threads(min(2, numba.get_num_threads()))  # 1334 pixels: >= 4 blocks each
    monkeypatch.setattr(_config, "L2_BYTES", 4096)
    monkeypatch.setattr(_config, "CPU_TILE_MAX_PIXELS", 256)
    if slab_taps:
        monkeypatch.setattr(_config, "CPU_TILE_BYTES", slab_taps * c * dt.itemsize * 256)
        monkeypatch.setattr(conv2d, "WIDE", False)  # im2col: the direct path takes any C_out
    x = rng.standard_normal((n, h, w, c)).astype(dt)
    kh = 1 if op == "pointwise" else 3
    geo = {} if op == "pointwise" else {"padding": "same"}
    wt = rng.standard_normal((kh, kh, c, c_out)).astype(dt)  # conv2d's weights
    dwk = rng.standard_normal((3, 3, c)).astype(dt)
    pw = rng.standard_normal((c, c_out)).astype(dt)
    bias, dw_bias = rng.standard_normal(c_out).astype(dt), rng.standard_normal(c).astype(dt)
    spec = make_spec(
        op, x_shape=x.shape, layout="NHWC", kernel=(kh, kh), c_in_kernel=c, multiplier=1,
        c_out=c_out, activation=Activation.RELU6, **geo,
    )  # fmt: skip
    name, at_panels, at_out = _PANELS_AT[op]
    k = getattr({"pointwise": pointwise, "separable": separable, "conv2d": conv2d}[op], name)
    weights, biases = {"pointwise": ((pw,), (bias,)), "separable": ((dwk, pw), (dw_bias, bias)),
                       "conv2d": ((wt,), (bias,))}[op]  # fmt: skip
    once = list(k.args(spec, dt, True)(x, weights, biases, np.empty(spec.out_nhwc, dt)))
    assert once[at_panels].shape[0] > 0  # the panels
    # the split: (tile, cblock, kc), and separable's worker count
    tile = [a for a in once if isinstance(a, tuple) and len(a) in (3, 4)][0][0]
    wbytes = (9 if op == "conv2d" else 1) * c * c_out * dt.itemsize
    assert packs_once(spec.pixels, tile, wbytes, True)
    if slab_taps:
        assert once[8] == slab_taps and once[9] is False
    elif op == "conv2d":
        assert once[9] is pointwise.WIDE  # the direct path with AVX-512
    per_task = list(once)
    per_task[at_panels], per_task[at_out] = no_packed(dt), np.empty_like(once[at_out])
    x_before = x.copy()
    k.parallel(*once)
    k.parallel(*per_task)
    np.testing.assert_array_equal(x, x_before)
    assert once[at_out].tobytes() == per_task[at_out].tobytes()
    if op == "separable":
        expected = ref_fn(op)(x, dwk, pw, dw_bias=dw_bias, bias=bias, activation="relu6", **geo)
    else:
        wr = pw if op == "pointwise" else wt
        expected = ref_fn(op)(x, wr, bias=bias, activation="relu6", **geo)
    assert_close(once[at_out].reshape(spec.out_nhwc), expected, dt, 9 * c)
    assert not packs_once(49, 49, 1 << 30, True)  # one pixel block: packed per task
    monkeypatch.setattr(_config, "L2_BYTES", 1 << 30)
    assert not packs_once(spec.pixels, tile, wbytes, True)  # the weights stay in cache


# ---------------------------------------------------------------------------------------------
# the 32-byte vector build (AVX2 and other hosts without AVX-512), forced on an AVX-512 host


@functools.cache
def _tile_runner():
    """A jitted call of ``gemm_tile`` (how=0), ``gemm_wide`` (1) or ``gemm_narrow`` (2) on one
    tile, with the kernels' scratch; ``fresh``: the blocks ask for dst's lines first."""
    from numba import njit

    from numba_dsconv.cpu._simd import address
    from numba_dsconv.cpu.pointwise import gemm_narrow, gemm_scratch, gemm_tile, gemm_wide

    @njit
    def run(a, a_t, rows, w, packed, bias, dst, c_lo, c_hi, act, acc, kc, how, fresh):
        pk, at, part = gemm_scratch(kc, rows, dst)
        if how == 0:  # the dispatcher
            gemm_tile(a, a_t, rows, w, packed, bias, dst, c_lo, c_hi, act, acc, pk, at,
                      part, address(a), 0, fresh)  # fmt: skip
        elif how == 1:  # the wide block alone (c_hi: the end of whole pairs)
            gemm_wide(a, a_t, rows, w, packed, bias, dst, c_lo, c_hi, act, acc, pk, at,
                      address(a), 0, fresh)  # fmt: skip
        else:
            gemm_narrow(a, a_t, rows, w, packed, bias, dst, c_lo, c_hi, act, acc, pk, at,
                        part, address(a), 0, fresh)  # fmt: skip

    return run


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kc", [2, 3, 8, 256])
@pytest.mark.parametrize("a_t", [False, True])
def test_gemm_wide_block(dtype, kc, a_t, rng):
    """The wide block (6 rows x two panels, AVX-512), alone (``gemm_wide``) and through
    ``gemm_tile``, against the narrow path (``gemm_narrow``) bit for bit and the float64
    formula; which channels ``gemm_tile`` gives it (``wide_columns``). Whole and short last row
    groups (6, 12, 17, 196 rows), a narrow tail of 7 or 8 rows after whole groups (49, 13, 50
    rows; ``wide_tail``) or alone (8 rows on ``gemm_wide`` itself: ``gemm_tile`` keeps them
    narrow, ``wide_pays``), the short group read in place or copied, one or two pairs of panels
    with a panel left over or cut by C_out, a channel range starting at the second panel,
    reduction blocks 1 to 128 deep, weights packed here or prepacked, sums accumulated into dst
    (acc), relu6 on the last block only, a reduction deep enough for A to come in several slabs
    (``WIDE_SLAB_BYTES``; 62 rows: with a tail); A as it is or stored transposed (``a_t``: the
    backward's d pw GEMM; its short group always copied). dst is a view with guard rows and
    columns around it: nothing outside it may change."""
    from numba_dsconv._spec import Activation
    from numba_dsconv.cpu import pointwise as pw
    from numba_dsconv.cpu.layout import bias_vector

    run = _tile_runner()
    nr = pw.gemm_panel_width(np.dtype(dtype).itemsize)
    # a reduction deep enough that A's columns come in three slabs or more (WIDE_SLAB_BYTES)
    deep = 3 * pw.WIDE_SLAB_BYTES // (62 * np.dtype(dtype).itemsize) + 5
    relu6 = int(Activation.RELU6)
    went_wide = 0
    for rows, k, c_out, c_lo, extra, acc, packed in [
        (6, 19, 2 * nr, 0, 0, False, False), (12, 300, 3 * nr, 0, 6, False, True),
        (17, 19, 2 * nr + 5, 0, 0, True, False), (17, 300, 4 * nr + 1, nr, 1, False, False),
        (196, 70, 5 * nr, 0, 2, True, True), (49, 40, 2 * nr, 0, 0, False, False),
        (8, 40, 2 * nr, 0, 0, False, True), (62, deep, 2 * nr + 3, 0, 0, True, False),
        (13, 300, 2 * nr + 7, 0, 0, True, True), (50, 19, 4 * nr, nr, 3, False, False),
    ]:  # fmt: skip
        c_mid = pw.wide_columns(rows, c_lo, c_out, kc, np.dtype(dtype).itemsize)
        if pw.WIDE:  # the dispatcher's choice: whole pairs where 6-row groups pay
            assert pw.wide_tail(rows) == {49: 7, 13: 7, 50: 8, 8: 8, 62: 8}.get(rows, 0)
            pays = rows != 8 and kc >= 2
            assert pw.wide_pays(rows) == (rows != 8)
            assert c_mid == (c_lo + (c_out - c_lo) // (2 * nr) * 2 * nr if pays else c_lo)
        else:
            assert c_mid == c_lo
        went_wide += c_mid > c_lo
        # gemm_wide alone on every whole pair (8 rows: the tail alone, which gemm_tile leaves
        # to the narrow path)
        pairs = c_lo + (c_out - c_lo) // (2 * nr) * 2 * nr if pw.WIDE and kc >= 2 else c_lo
        a = rng.uniform(-1, 1, (rows + extra, k)).astype(dtype)
        a_arg = np.ascontiguousarray(a.T) if a_t else a  # stored (K, rows + extra)
        w = rng.uniform(-1, 1, (k, c_out)).astype(dtype)
        panels = pw.packed_weights(w, False) if packed else pw.no_packed(np.dtype(dtype))
        bias = bias_vector(rng.uniform(-1, 1, c_out).astype(dtype), c_out, np.dtype(dtype), nr)
        start = rng.uniform(-1, 1, (rows, c_out)).astype(dtype)
        want = (start if acc else bias[:c_out]).astype(np.float64) + a[:rows].astype(
            np.float64
        ) @ w.astype(np.float64)
        want = np.clip(want, 0, 6)
        results = []
        for how, c_hi in ((0, c_out), (1, pairs), (2, c_out)):
            if c_hi == c_lo:
                continue  # the wide block has no pair here
            big = np.full((rows + 4, c_out + 2 * nr), 7.5, dtype)
            dst = big[2 : 2 + rows, nr : nr + c_out]
            dst[:] = start
            fresh = rows % 2 == 1  # dst's lines asked for first (a hint: the same bits)
            run(a_arg, a_t, rows, w, panels, bias, dst, c_lo, c_hi, relu6, acc, kc, how, fresh)
            outside = big.copy()
            outside[2 : 2 + rows, nr : nr + c_out] = 7.5
            assert (outside == 7.5).all(), (rows, c_out, c_lo, how)  # nothing else written
            np.testing.assert_array_equal(dst[:, :c_lo], start[:, :c_lo])
            np.testing.assert_array_equal(dst[:, c_hi:], start[:, c_hi:])
            results.append(dst[:, c_lo:c_hi].copy())
        narrow = results[-1]
        for r in results[:-1]:  # the same bits as the narrow path, on the same channels
            np.testing.assert_array_equal(r, narrow[:, : r.shape[1]])
        assert_close(narrow, want[:, c_lo:], np.dtype(dtype), k)
    assert went_wide == (9 if pw.WIDE else 0)
    if pw.WIDE:  # conv2d's direct path has no tail: a 49-row tile stays on im2col
        assert not pw.wide_groups_pay(49) and pw.wide_groups_pay(196)


def test_32_byte_vector_build():
    llvm = pytest.importorskip("llvmlite.binding")
    feats = llvm.get_host_cpu_features().flatten().split(",")
    if "+avx512f" not in feats:
        pytest.skip("this host runs the 32-byte build in the rest of the suite already")
    no512 = ",".join("-" + f[1:] if "avx512" in f else f for f in feats)
    env = dict(os.environ, NUMBA_CPU_FEATURES=no512, NUMBA_DSCONV_NO_CACHE="1")
    probe = "from numba_dsconv.cpu._simd import VEC_BYTES; assert VEC_BYTES == 32, VEC_BYTES"
    r = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    select = "gemm_blocking or worked_example or medium or parallel or block_peak or packed_once"
    select += " or every_phase"
    # the backward kernels: every gradient against float64, the bits at any thread count, the
    # 3x3 dx in pairs of channel vectors
    select += " or grads_against_reference or same_bits_at_any_thread_count or dx_two_vectors"
    select += " or dx_at_stride_2 or dx3x3_pair or panels_hold_every_weight"
    here = os.path.dirname(__file__)
    ops = os.path.join(here, "test_ops.py")
    bench = os.path.join(here, "test_bench.py")  # the GEMM block ceiling
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, ops]
    cmd += [bench] + [os.path.join(here, f) for f in ("test_grad.py", "test_packing.py")]
    cmd += ["-k", f"({select}) and not cuda"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and " failed" not in r.stdout


# ---------------------------------------------------------------------------------------------
# the 3x3 depthwise's channel vectors: x at every phase of a 64-byte line (the first vector
# unaligned, the next ones aligned, the last one overlapping), C not a whole number of vectors


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("c", [3, 20, 112, 128, 256, 264])
@pytest.mark.parametrize("stride", [1, 2])
def test_depthwise_channel_vectors_at_every_phase(dtype, c, stride, rng):
    from reference import ref_depthwise, ref_separable

    from numba_dsconv.cpu._simd import VEC_BYTES
    from numba_dsconv.cpu.depthwise import HEAD_MIN_VECTORS, vector_head

    itemsize = np.dtype(dtype).itemsize
    shape = (2, 9, 10, c)
    pw = rng.uniform(-1, 1, (c, 40)).astype(dtype)
    dw = rng.uniform(-1, 1, (3, 3, c)).astype(dtype)
    bias = rng.uniform(-1, 1, c).astype(dtype)
    values = rng.uniform(-1, 1, shape).astype(dtype)
    results = []
    for phase in range(0, 64, itemsize):
        # x starting ``phase`` bytes past a 64-byte boundary
        raw = np.empty(values.size + 128 // itemsize, dtype)
        off = ((phase - raw.ctypes.data) % 64) // itemsize
        x = raw[off : off + values.size].reshape(shape)
        x[...] = values
        assert x.ctypes.data % 64 == phase
        # the path under test: from the first aligned vector on (x's phase), where there are
        # enough whole vectors per pixel, else the vectors from channel 0
        head = vector_head(x.ctypes.data, c, itemsize)
        lanes = VEC_BYTES // itemsize
        if phase % VEC_BYTES and c % lanes == 0 and c >= HEAD_MIN_VECTORS * lanes:
            assert (x.ctypes.data + head * itemsize) % VEC_BYTES == 0 and 0 < head < lanes
        else:
            assert head == 0
        kw = dict(stride=stride, padding=1)
        y = nd.depthwise(x, dw, bias=bias, activation="relu6", **kw)
        s = nd.separable(x, dw, pw, dw_bias=bias, mid_activation="relu6", **kw)
        assert_close(y, ref_depthwise(values, dw, bias=bias, activation="relu6", **kw), dtype, 9)
        ref = ref_separable(values, dw, pw, dw_bias=bias, mid_activation="relu6", **kw)
        assert_close(s, ref, dtype, 9 * c)
        np.testing.assert_array_equal(x, values)  # unmodified
        results.append((y, s))
    # every lane's sum runs alike whichever vector computes it: the same bits at every phase
    for y, s in results[1:]:
        np.testing.assert_array_equal(y, results[0][0])
        np.testing.assert_array_equal(s, results[0][1])


@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_large_results_start_on_a_cache_line(op, layout, dtype, rng):
    """A result of RESULT_ALIGN_MIN_BYTES or more (and the NHWC copy of a C-contiguous NCHW x)
    starts on a 64-byte boundary, from the full path and from the fast path, the values those
    of the reference (smaller ones are NumPy's placement: cpu.layout.result_allocator); so
    does the gradient of such an x."""
    from numba_dsconv.cpu import layout as lay

    c_in = c_out = 16
    side = 1 + int(np.sqrt(lay.RESULT_ALIGN_MIN_BYTES / (4 * c_out)))  # a result just over
    for shape, large in (((1, side, side, c_in), True), ((1, 6, 5, c_in), False)):
        x = rng.uniform(-1, 1, shape).astype(dtype)
        if layout == "NCHW":
            x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        if dtype == np.float64:
            x = x[0]  # one image, unbatched (the result twice the bytes: large still)
        weights = {
            "separable": (rng.uniform(-1, 1, (3, 3, c_in)), rng.uniform(-1, 1, (c_in, c_out))),
            "depthwise": (rng.uniform(-1, 1, (3, 3, c_in, 2)),),
            "pointwise": (rng.uniform(-1, 1, (c_in, c_out)),),
            "conv2d": (rng.uniform(-1, 1, (3, 3, c_in, c_out)),),
        }[op]
        weights = tuple(w.astype(dtype) for w in weights)
        kw = {} if op == "pointwise" else {"padding": 1}
        first = lib_fn(op)(x, *weights, layout=layout, **kw)
        again = lib_fn(op)(x, *weights, layout=layout, **kw)  # the fast path
        assert (first.nbytes >= lay.RESULT_ALIGN_MIN_BYTES) == large
        for y in (first, again):
            assert y.flags.c_contiguous and bitwise_equal(y, first)
            if large:
                assert y.ctypes.data % 64 == 0
        ref = ref_fn(op)(x, *weights, layout=layout, **kw)
        assert_close(first, ref, dtype, 9 * c_in)
        # d x, the grad of the layer before, is placed alike (cpu.backward._grad_x_empty)
        gx = getattr(nd, f"{op}_grad")(np.ones_like(first), x, *weights, layout=layout, **kw).x
        assert gx.shape == x.shape and (gx.ctypes.data % 64 == 0 or not large)
    # the kernels' dtypes (one jitted call), and others: a byte order Numba has no arrays of,
    # float16, sizes that do not divide 64 (96), a dtype given as a type, a shape as a list
    for kind in (np.float32, np.float64, np.uint8, np.complex128, "V96", ">f8", np.float16):
        for shape in ((0,), (5,), (3, 7, 9), (2, 1, 3, 5)):
            a, b = lay.aligned_empty(shape, np.dtype(kind)), lay.aligned_empty(list(shape), kind)
            for c in (a, b):
                assert c.shape == shape and c.dtype == np.dtype(kind) and c.flags.c_contiguous
                assert c.flags.writeable and (c.size == 0 or c.ctypes.data % 64 == 0)
            assert a.size == 0 or not np.shares_memory(a, b)
    for kind in (np.float32, np.float64, np.uint8):  # a boundary their items cannot all reach
        a = lay.aligned_empty((7, 3), np.dtype(kind), 12)
        assert a.shape == (7, 3) and a.dtype == kind and a.ctypes.data % 12 == 0
