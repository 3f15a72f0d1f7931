"""Packed weights (numba_dsconv.pack): a snapshot of pw (or of conv2d's w) in the GEMM
micro-kernel's panel layout, read by the CPU kernels as it is. Every call with packed weights
must give, to the bit, what the same call with the array gives, and the reference's values."""

from __future__ import annotations

import numpy as np
import pytest
from cases import make_case
from helpers import bitwise_equal, check_against_reference

import numba_dsconv as nd
from numba_dsconv import api

OPS = ("pointwise", "separable", "conv2d")


def _case(rng, op, *, n=2, c=3, c_out=5, dtype=np.float32, mult=2):
    x, weights, bias_kw, red = make_case(
        rng, op, n=n, h=9, w=8, c=c, kh=3, kw=3, mult=mult if op == "separable" else 1,
        c_out=c_out, xdtype=dtype, layout="NHWC", batched=True, biases=True,
    )  # fmt: skip
    kwargs = dict(bias_kw, activation="relu6")
    if op == "separable":
        kwargs.update(padding="same", stride=2, mid_activation="relu")
    if op == "conv2d":
        kwargs.update(padding="same", stride=2)
    return x, list(weights), kwargs, red


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size", ["small", "parallel"])
def test_packed_calls_equal_plain_calls_to_the_bit(op, dtype, size):
    rng = np.random.default_rng(3)
    # "parallel": enough work for the parallel build, C_out past one panel and not a multiple
    dims = dict(n=4, c=48, c_out=75) if size == "parallel" else {}
    x, weights, kwargs, red = _case(rng, op, dtype=dtype, **dims)
    packed = nd.pack(weights[-1])
    for _ in range(2):  # the second call takes the fast path
        plain = getattr(nd, op)(x, *weights, **kwargs)
        got = check_against_reference(op, x, [*weights[:-1], packed], red, **kwargs)
        assert bitwise_equal(got, plain)


@pytest.mark.parametrize("form", ["4-D", "F-order", "torch"])
def test_every_form_of_pw_packs(form):
    rng = np.random.default_rng(4)
    x, (dw, pw), kwargs, red = _case(rng, "separable", c=6, c_out=40)
    if form == "4-D":
        given = pw.reshape(1, 1, *pw.shape)
    elif form == "F-order":
        given = np.asfortranarray(pw)
    else:  # torch's pointwise weight (C_out, C_in) seen transposed, as numba_dsconv.torch does
        torch = pytest.importorskip("torch")
        given = torch.from_numpy(np.ascontiguousarray(pw.T)).T
    packed = nd.pack(given)
    assert packed.shape == tuple(given.shape)
    assert packed.dtype == pw.dtype and packed.ndim == len(given.shape)
    assert np.array_equal(np.asarray(packed), np.asarray(given))
    got = check_against_reference("separable", x, [dw, packed], red, **kwargs)
    assert bitwise_equal(got, nd.separable(x, dw, pw, **kwargs))


def test_a_pack_is_a_snapshot():
    rng = np.random.default_rng(5)
    x, (pw,), kwargs, _ = _case(rng, "pointwise")
    before = nd.pointwise(x, pw, **kwargs)
    packed = nd.pack(pw)
    pw[...] = 0  # the caller's array changes; the packed weights do not
    assert bitwise_equal(nd.pointwise(x, packed, **kwargs), before)
    assert not packed.weights.flags.writeable and not packed.panels.flags.writeable
    assert nd.pack(packed) is packed


def test_same_shapes_other_values_through_the_fast_path():
    rng = np.random.default_rng(6)
    x, (dw, pw), kwargs, _ = _case(rng, "separable")
    a, b = nd.pack(pw), nd.pack(pw * 2 + 1)
    nd.separable(x, dw, a, **kwargs)
    assert any(k[0] == "separable" and k[3][1] is nd.PackedWeights for k in api._FAST)
    expected = nd.separable(x, dw, pw * 2 + 1, **kwargs)
    assert bitwise_equal(nd.separable(x, dw, b, **kwargs), expected)


def test_another_dtype_converts_as_an_array_would():
    rng = np.random.default_rng(7)
    x, (dw, pw), kwargs, red = _case(rng, "separable", dtype=np.float64)
    pw32 = pw.astype(np.float32)
    got = check_against_reference("separable", x, [dw, nd.pack(pw32)], red, **kwargs)
    assert got.dtype == np.float64
    assert bitwise_equal(got, nd.separable(x, dw, pw32, **kwargs))


def test_gradients_and_torch_inputs_take_packed_weights():
    rng = np.random.default_rng(8)
    x, (dw, pw), kwargs, _ = _case(rng, "separable")
    y = nd.separable(x, dw, pw, **kwargs)
    g = rng.standard_normal(y.shape).astype(y.dtype)
    plain = nd.separable_grad(g, x, dw, pw, **kwargs)
    packed = nd.separable_grad(g, x, dw, nd.pack(pw), **kwargs)
    for field in plain._fields:
        assert bitwise_equal(getattr(packed, field), getattr(plain, field)), field
    torch = pytest.importorskip("torch")
    got = nd.separable(torch.from_numpy(x), dw, nd.pack(pw), **kwargs)
    assert isinstance(got, torch.Tensor) and bitwise_equal(got, y)


def test_conv2d_reads_the_callers_panels_in_every_path(monkeypatch):
    """A packed w is never packed again (the kernels read its panels), and gradients, torch and
    dask inputs take it as they take the array."""
    from numba_dsconv.cpu import conv2d

    rng = np.random.default_rng(11)
    x, (w,), kwargs, _ = _case(rng, "conv2d", n=4, c=48, c_out=75)
    packed = nd.pack(w)
    assert packed.shape == w.shape and packed.weights.shape == (9 * 48, 75)
    plain = nd.conv2d(x, w, **kwargs)

    def no_packing(*args):
        raise AssertionError("packed weights packed again")

    monkeypatch.setattr(conv2d, "kernel_panels", no_packing)
    assert bitwise_equal(nd.conv2d(x, packed, **kwargs), plain)
    monkeypatch.undo()
    g = rng.standard_normal(plain.shape).astype(plain.dtype)
    want = nd.conv2d_grad(g, x, w, **kwargs)
    got = nd.conv2d_grad(g, x, packed, **kwargs)
    for field in want._fields:
        assert bitwise_equal(getattr(got, field), getattr(want, field)), field
    assert got.w.shape == w.shape
    # a float64 call converts the float32 pack's weights as it would an array's
    x64 = x.astype(np.float64)
    assert bitwise_equal(nd.conv2d(x64, packed, **kwargs), nd.conv2d(x64, w, **kwargs))
    da = pytest.importorskip("dask.array")
    lazy = nd.conv2d(da.from_array(x, chunks=(1, 5, 8, 48)), packed, **kwargs)
    assert bitwise_equal(lazy.compute(scheduler="sync"), plain)
    torch = pytest.importorskip("torch")
    got = nd.conv2d(torch.from_numpy(x), packed, **kwargs)
    assert isinstance(got, torch.Tensor) and bitwise_equal(got, plain)


def test_dask_x_with_packed_weights():
    da = pytest.importorskip("dask.array")
    rng = np.random.default_rng(9)
    x, (dw, pw), kwargs, _ = _case(rng, "separable", n=3)
    lazy = nd.separable(da.from_array(x, chunks=(1, 5, 8, 3)), dw, nd.pack(pw), **kwargs)
    assert bitwise_equal(lazy.compute(scheduler="sync"), nd.separable(x, dw, pw, **kwargs))


def test_bad_packs_and_misplaced_packed_weights_are_named():
    pw = np.ones((4, 6), np.float32)
    with pytest.raises(TypeError, match="pw must be float32 or float64"):
        nd.pack(pw.astype(np.int32))
    with pytest.raises(ValueError, match=r"pw must be 2-D"):
        nd.pack(np.ones(4, np.float32))
    with pytest.raises(ValueError, match=r"pw must be 2-D .* or \(K_h, K_w, C_in, C_out\)"):
        nd.pack(np.ones((3, 4, 6), np.float32))
    with pytest.raises(ValueError, match="non-zero channels"):
        nd.pack(np.ones((0, 6), np.float32))
    with pytest.raises(ValueError, match=r"non-zero channels; got shape \(1, 1, 4, 0\)"):
        nd.pack(np.ones((1, 1, 4, 0), np.float32))  # the shape as given, not as a matrix
    with pytest.raises(ValueError, match="no zero-sized dimension"):
        nd.pack(np.ones((3, 3, 0, 6), np.float32))
    x = np.ones((1, 5, 5, 4), np.float32)
    packed = nd.pack(pw)
    with pytest.raises(TypeError, match="dw is a PackedWeights"):
        nd.separable(x, packed, pw)
    with pytest.raises(TypeError, match="x is a PackedWeights"):
        nd.pointwise(packed, pw)
    with pytest.raises(ValueError, match="w must be 4-D"):  # pointwise weights as conv2d's
        nd.conv2d(x, packed)
    conv = nd.pack(np.ones((2, 1, 4, 6), np.float32))  # a 2 x 1 kernel: conv2d weights
    assert conv.shape == (2, 1, 4, 6) and conv.weights.shape == (8, 6)
    with pytest.raises(ValueError, match=r"\(1, 1, C_in, C_out\)"):  # conv2d's as pw
        nd.pointwise(x, conv)
    with pytest.raises(ValueError, match="pw expects 4 input channels"):
        nd.separable(x, np.ones((3, 3, 2), np.float32), packed)


@pytest.mark.parametrize("op", OPS)
def test_packed_weights_on_every_device(op, device):
    """The CUDA backend reads a PackedWeights' weights (its panels are the CPU's)."""
    rng = np.random.default_rng(10)
    x, weights, kwargs, red = _case(rng, op)
    got = check_against_reference(op, x, [*weights[:-1], nd.pack(weights[-1])], red,
                                  device=device, **kwargs)  # fmt: skip
    assert bitwise_equal(got, getattr(nd, op)(x, *weights, device=device, **kwargs))


def test_torch_prepack_follows_tracked_changes():
    torch = pytest.importorskip("torch")
    import numba_dsconv.torch as ndt

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        ndt.SeparableConv2d(8, 40, 3, padding=1, activation="relu"),
        ndt.PointwiseConv2d(40, 24, activation="relu6"),
        ndt.Conv2d(24, 36, 3, padding=1),
        torch.nn.ReLU(),
    )
    x = torch.randn(2, 8, 9, 9).contiguous(memory_format=torch.channels_last)
    sep, pw, conv = model[0], model[1], model[2]
    with torch.no_grad():
        plain = model(x)
        assert ndt.prepack(model) is model
        for w in (sep.pw_weight, pw.weight, conv.weight):
            assert ndt._PACKS.get(w) is not None
        assert ndt._PACKS[conv.weight][1].shape == (3, 3, 24, 36)  # the core's (K, K, C_in, C_out)
        assert bitwise_equal(model(x), plain)
        # a change torch tracks (in place, as an optimizer step) is packed again
        sep.pw_weight.mul_(-1.5)
        pw.weight.add_(0.25)
        conv.weight.mul_(0.5)
        changed = model(x)
        assert ndt._PACKS[sep.pw_weight][0] == ndt._pack_state(sep.pw_weight)
        assert ndt._PACKS[conv.weight][0] == ndt._pack_state(conv.weight)
    ndt._PACKS.pop(sep.pw_weight)
    ndt._PACKS.pop(pw.weight)
    ndt._PACKS.pop(conv.weight)
    with torch.no_grad():
        assert bitwise_equal(changed, model(x))
        assert not bitwise_equal(changed, plain)
        ndt.prepack(model)
    # training: each step's change is packed again; the results and gradients are those of
    # the plain layers
    with torch.no_grad():
        sep.pw_weight.mul_(2)
    y = model(x)
    assert ndt._PACKS[sep.pw_weight][0] == ndt._pack_state(sep.pw_weight)
    y.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    ndt._PACKS.pop(sep.pw_weight)
    ndt._PACKS.pop(pw.weight)
    ndt._PACKS.pop(conv.weight)
    for p in model.parameters():
        p.grad = None
    y2 = model(x)
    y2.sum().backward()
    assert bitwise_equal(y, y2)
    for g, p in zip(grads, model.parameters(), strict=True):
        assert bitwise_equal(g, p.grad)


@pytest.mark.parametrize("shape", [(1,), (7, 5), (3, 33, 32)])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float64])
def test_weight_panels_start_on_a_cache_line(shape, dtype):
    """The micro-kernel reads panels by 64-byte vectors: NumPy's own buffers start 16 bytes
    past a line, so that half or more of those loads would span two lines."""
    from numba_dsconv.cpu.layout import aligned_empty, scratch

    for _ in range(3):
        a = aligned_empty(shape, np.dtype(dtype))
        assert a.shape == shape and a.dtype == dtype and a.flags.c_contiguous
        assert a.ctypes.data % 64 == 0
    s = scratch("test_alignment", shape, np.dtype(dtype))
    assert s.shape == shape and s.ctypes.data % 64 == 0
    for c_out in (5, 64, 75):
        pw = np.ones((48, c_out), dtype=np.float32)
        assert nd.pack(pw).panels.ctypes.data % 64 == 0
        assert nd.pack(np.asfortranarray(pw)).panels.ctypes.data % 64 == 0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("parallel", [False, True])
def test_panels_hold_every_weight_in_place(dtype, order, parallel):
    """packed[p, k, j] == W[k, p * NR + j], 0 past C_out: C-ordered W (runs of rows) and
    F-ordered W (torch's (C_out, C_in) weight seen transposed: square blocks of a vector's
    lanes transposed in registers), with reduction depths around the block and C_out around
    the panel width (a cut last panel)."""
    from numba_dsconv.cpu.pointwise import gemm_panel_width, packed_weights

    rng = np.random.default_rng(8)
    nr = gemm_panel_width(np.dtype(dtype).itemsize)
    for k in (1, 15, 16, 17, 40, 64):
        for c_out in (1, nr - 1, nr, nr + 1, 3 * nr - 5):
            w = rng.standard_normal((k, c_out)).astype(dtype)
            given = np.asfortranarray(w) if order == "F" else w
            packed = packed_weights(given, parallel)
            npan = -(-c_out // nr)
            expected = np.zeros((k, npan * nr), dtype)
            expected[:, :c_out] = w
            expected = expected.reshape(k, npan, nr).transpose(1, 0, 2)
            assert packed.shape == (npan, k, nr)
            assert np.array_equal(packed, expected), (k, c_out)
