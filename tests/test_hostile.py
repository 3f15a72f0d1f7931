"""Hostile inputs, one section per bug class (issue: bounded geometry, exotic arrays, aliasing
buffers, the cost model's integers, an unusable kernel cache, the command line). Each class is
tested as a class (hypothesis or a sweep of its members), not only through the examples that
found it. Processes (fork, spawn, forkserver) are in test_processes.py."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
from helpers import ALL_OPS, bitwise_equal, geo_kwargs, lib_fn, ref_fn
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import numba_dsconv as nd
from numba_dsconv import _dispatch, _spec, cli

SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)
GEOMETRY_OPS = ("conv2d", "depthwise", "separable")


def _weights(op, rng, kh, kw, c, c_out=3, dtype=np.float32):
    dw = rng.standard_normal((kh, kw, c)).astype(dtype)
    pw = rng.standard_normal((c, c_out)).astype(dtype)
    w = rng.standard_normal((kh, kw, c, c_out)).astype(dtype)
    return {"conv2d": (w,), "depthwise": (dw,), "separable": (dw, pw), "pointwise": (pw,)}[op]


# --------------------------------------------------------------------------------------------
# 1. geometry: every index the kernels form fits in 64 bits, or a ValueError names the argument

HUGE_VALUES = [2**31 - 1, 2**31, 2**32 + 1, 2**40, 2**55, 2**61, 2**62, 2**63 - 1, 2**63,
               2**64, 5 * 10**18, 10**19, 2**70]  # fmt: skip
SIZE = st.one_of(st.integers(1, 4), st.sampled_from(HUGE_VALUES))


@st.composite
def _dimension(draw, size, k):
    """(dilation, (pad before, pad after), stride) of one spatial dimension, each small or
    huge, with a non-empty output of at most 50 positions (larger ones are MemoryError's)."""
    d = draw(SIZE)
    span = (k - 1) * d + 1
    total = max(0, span - size) + draw(st.one_of(st.integers(0, 3), st.sampled_from(HUGE_VALUES)))
    before = draw(st.sampled_from([0, 1, total // 2, total]))
    before = min(before, total)
    smallest = (size + total - span) // 50 + 1
    strides = [v for v in HUGE_VALUES if v >= smallest]
    stride = draw(
        st.one_of(st.integers(smallest, smallest + 3), st.sampled_from(strides or [smallest]))
    )
    return d, (before, total - before), stride


@st.composite
def hostile_geometry(draw):
    op = draw(st.sampled_from(GEOMETRY_OPS))
    kh, kw = draw(st.sampled_from([(1, 1), (3, 3), (5, 1), (1, 5), (3, 3), (2, 3)]))
    h, w = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    dh, ph, sh = draw(_dimension(h, kh))
    dw, pw, sw = draw(_dimension(w, kw))
    return op, (kh, kw), (h, w), (sh, sw), (dh, dw), (ph, pw)


@SETTINGS
@given(hostile_geometry(), st.sampled_from(["NHWC", "NCHW"]))
def test_huge_geometry_is_refused_or_exact(geo, layout):
    """Either the call is refused with a ValueError naming the argument, or it equals the
    float64 reference (which reads the padded input pixel by pixel with Python integers).
    Never a wrapped index: no input value where only padding is read, no crash."""
    op, (kh, kw), (h, w), stride, dilation, padding = geo
    rng = np.random.default_rng(0)
    c = 16  # a whole float32 vector: the 3x3 fast path's vector code runs
    x = rng.standard_normal((1, h, w, c) if layout == "NHWC" else (1, c, h, w))
    x = x.astype(np.float32)
    weights = _weights(op, rng, kh, kw, c)
    kwargs = dict(stride=stride, dilation=dilation, padding=padding, layout=layout)
    try:
        got = lib_fn(op)(x, *weights, **kwargs)
    except ValueError as exc:
        msg = str(exc)
        assert "too large" in msg and any(
            name in msg for name in ("stride=", "padding=", "dilation=", "kernel")
        ), msg
        # refusing is justified only where some value is beyond what a sane bound allows:
        # with every value <= 2**40 on this tiny x no index comes near 2**62
        assert max(*stride, *dilation, *padding[0], *padding[1]) > 2**40, msg
        return
    expected = ref_fn(op)(x, *weights, **kwargs)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("kernel", "kwargs", "culprit"),
    [
        ((1, 1), dict(stride=(2**62, 1), padding=((0, 2**64), (0, 0))), "padding="),
        ((5, 1), dict(dilation=(2**62, 1), padding=((0, 2**64), (0, 0))), "dilation="),
        ((3, 3), dict(dilation=(5 * 10**18, 1), padding=((0, 10**19), (1, 1))), "dilation="),
        ((3, 1), dict(dilation=(5 * 10**18, 1), padding=((0, 10**19), (0, 0))), "dilation="),
        ((1, 3), dict(dilation=(1, 5 * 10**18), padding=((0, 0), (0, 10**19))), "dilation="),
        ((1, 1), dict(stride=(2**63, 1)), "stride="),
        ((1, 1), dict(stride=2**64), "stride="),
        ((3, 3), dict(dilation=2**63, padding=2**64), "padding="),  # the larger term
        ((1, 1), dict(stride=(np.uint64(2**63), 1)), "stride="),
    ],
)
@pytest.mark.parametrize("op", GEOMETRY_OPS)
def test_issue_examples_are_refused(op, kernel, kwargs, culprit):
    """The reported wraps (input values read from the padding, 2x results, a segfault in the
    3x3 path; an OverflowError or numba TypingError for 2**63) are ValueErrors naming the
    argument, whatever ran before (a normal call first types the kernels)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 5, 5, 16)).astype(np.float32)
    weights = _weights(op, rng, *kernel, 16)
    lib_fn(op)(x, *weights)
    with pytest.raises(ValueError, match=culprit):
        lib_fn(op)(x, *weights, **kwargs)


@pytest.mark.parametrize("op", GEOMETRY_OPS)
def test_large_but_representable_geometry_runs(op):
    """The bound refuses only what could wrap: a stride or padding far past the image (2**40)
    still computes the exact result."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 5, 4, 16)).astype(np.float32)
    weights = _weights(op, rng, 3, 3, 16)
    for kwargs in (
        dict(stride=2**40),
        dict(stride=(1, 2**40), dilation=(1, 2**20), padding=((1, 1), (2**21, 2**21))),
        dict(stride=2**45, dilation=2**44, padding=2**45),
    ):
        got = lib_fn(op)(x, *weights, **kwargs)
        np.testing.assert_allclose(got, ref_fn(op)(x, *weights, **kwargs), rtol=1e-5, atol=1e-5)


def test_index_bound_is_tight_at_the_limit():
    """Just below the limit runs, just above is refused (the check is a bound, not a guess)."""
    x = np.ones((1, 1, 1, 1), np.float32)
    k = np.ones((1, 1, 1), np.float32)
    # one pixel, one channel: the bound is ((N+1) + rows + cols) * 8 bytes with
    # rows = 1 + stride + 1, cols = 1 + 1 + 1 (1x1 kernel: span 1)
    limit_stride = _spec.INDEX_LIMIT // 8 - 2 - 2 - 3
    assert nd.depthwise(x, k, stride=(limit_stride - 1, 1)).shape == (1, 1, 1, 1)
    with pytest.raises(ValueError, match="stride="):
        nd.depthwise(x, k, stride=(limit_stride, 1))


@pytest.mark.parametrize("op", ["separable", "pointwise", "conv2d"])
def test_cuda_pixel_coordinate_bound_through_the_api(op, device, monkeypatch):
    """Through the API (the limit patched small): refused before anything is allocated or
    copied; depthwise (64-bit throughout) is not limited."""
    if device != "cuda":
        pytest.skip("the CUDA kernels' limit")
    backend = pytest.importorskip("numba_dsconv.cuda.backend")
    monkeypatch.setattr(backend, "INT32_MAX", 5)
    rng = np.random.default_rng(10)
    x, weights, _ = _op_args(op, rng)  # 6 x 5 images of a batch of 2
    kw = geo_kwargs(op, padding=1)
    with pytest.raises(ValueError, match="6 output rows exceed the CUDA kernels' 32-bit"):
        lib_fn(op)(x, *weights, device=device, **kw)
    dw = rng.standard_normal((3, 3, 4)).astype(np.float32)
    assert nd.depthwise(x, dw, padding=1, device=device).shape == (2, 6, 5, 4)


def test_cuda_pixel_coordinates_are_bounded():
    """The CUDA GEMM keeps tile pixels' (image, row, column) in int32: larger extents are a
    ValueError naming x, before any launch."""
    backend = pytest.importorskip("numba_dsconv.cuda.backend")
    spec = _spec.make_spec(
        "pointwise", x_shape=(2**31, 1, 1, 1), layout="NHWC", kernel=(1, 1), c_in_kernel=1,
        multiplier=1, c_out=1,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"x: 2147483648 batch exceed the CUDA kernels' 32-bit"):
        backend._check_int32_extents(spec)
    ok = _spec.make_spec(
        "pointwise", x_shape=(2**31 - 1, 1, 1, 1), layout="NHWC", kernel=(1, 1),
        c_in_kernel=1, multiplier=1, c_out=1,
    )  # fmt: skip
    backend._check_int32_extents(ok)


# --------------------------------------------------------------------------------------------
# 2. cost(): exact Python integers, whatever integer type came in

INT_TYPES = (int, np.int64, np.int32, np.uint64, np.int16)


@SETTINGS
@given(
    st.tuples(st.integers(0, 10**4), st.integers(1, 10**4), st.integers(1, 10**4),
              st.integers(1, 10**4)),
    st.integers(1, 7),
    st.integers(1, 10**12),
    st.integers(1, 64),
    st.sampled_from(INT_TYPES),
)  # fmt: skip
def test_cost_counts_are_exact_ints(shape, k, c_out, mult, kind):
    def conv(v):
        return kind(v) if kind is int or v <= np.iinfo(kind).max else v

    n, h, w, c_in = shape
    assume(h >= k and w >= k)
    c = nd.cost(tuple(conv(v) for v in shape), conv(k), conv(c_out), depth_multiplier=conv(mult))
    pix = n * (h - k + 1) * (w - k + 1)
    fields = {
        "standard_macs": pix * k * k * c_in * c_out,
        "depthwise_macs": pix * k * k * c_in * mult,
        "pointwise_macs": pix * c_in * mult * c_out,
        "standard_params": k * k * c_in * c_out,
        "separable_params": k * k * c_in * mult + c_in * mult * c_out,
    }
    for name, expected in fields.items():
        value = getattr(c, name)
        assert type(value) is int and value == expected, (name, value, expected)
    assert all(type(v) is int for v in c.output_shape)


def test_cost_issue_example_and_negative_batch():
    c = nd.cost((1000, 1000, 1000), 3, np.int64(10**10))
    assert c.standard_macs == 998 * 998 * 9 * 1000 * 10**10 > 0
    with pytest.raises(ValueError, match="N >= 0"):
        nd.cost((-1, 5, 5, 3), 3, 4)
    for shape in ((0, 5, 5, 3), (5, 0, 3), (1, 5, 5, 0)):
        if shape[0] == 0 and len(shape) == 4:
            assert nd.cost(shape, 3, 4).standard_macs == 0
        else:
            with pytest.raises(ValueError, match="positive H, W, C_in"):
                nd.cost(shape, 3, 4)


# --------------------------------------------------------------------------------------------
# 3. out= whose elements alias each other is refused


def _offsets(shape, strides):
    offs = [0]
    for n, s in zip(shape, strides, strict=True):
        offs = [o + i * s for o in offs for i in range(n)]
    return offs


@SETTINGS
@given(
    st.lists(st.integers(1, 4), min_size=1, max_size=4).flatmap(
        lambda shape: st.tuples(
            st.just(tuple(shape)),
            st.tuples(*[st.integers(-40, 40).map(lambda v: 4 * v) for _ in shape]),
        )
    )
)
def test_self_overlap_is_sound(geom):
    """self_overlapping never calls an aliasing layout disjoint (brute force over every
    element's byte range), and never refuses a layout NumPy itself produces (below)."""
    shape, strides = geom
    offs = _offsets(shape, strides)
    cells = set()
    aliasing = False
    for o in offs:
        span = set(range(o, o + 4))
        aliasing |= bool(cells & span)
        cells |= span
    if aliasing:
        assert _dispatch.self_overlapping(shape, strides, 4)


def test_numpy_views_are_not_refused():
    base = np.zeros((4, 6, 5, 8), np.float32)
    views = [base, base[:, ::2], base[..., ::-1], base.transpose(0, 3, 1, 2), base[:, 1:4, ::-2],
             np.asfortranarray(base), base[None, 0], base[:, :, :1]]  # fmt: skip
    for v in views:
        assert not _dispatch.self_overlapping(v.shape, v.strides, v.itemsize), v.strides


def _aliasing_outs(shape):
    import numpy.lib.stride_tricks as tricks

    size = int(np.prod(shape))
    yield tricks.as_strided(np.zeros(shape[-1], np.float32), shape, (0, 0, 0, 4), writeable=True)
    flat = np.zeros(size, np.float32)
    strides = (size * 4 // shape[0], 4 * shape[3], 4, 4)  # the last two dimensions overlap
    yield tricks.as_strided(flat, shape, strides, writeable=True)
    buf = np.zeros(shape, np.float32)
    yield tricks.as_strided(buf, shape, (buf.strides[0], 0, *buf.strides[2:]), writeable=True)


@pytest.mark.parametrize("op", ALL_OPS)
def test_aliasing_out_is_refused(op):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 5, 5, 4)).astype(np.float32)
    weights = _weights(op, rng, 3, 3, 4) if op != "pointwise" else _weights(op, rng, 1, 1, 4)
    shape = lib_fn(op)(x, *weights).shape
    outs = list(_aliasing_outs(shape))
    torch = _optional_torch()
    if torch is not None:
        outs.append(torch.zeros(shape[-1]).expand(*shape))
        outs.append(torch.zeros(int(np.prod(shape))).as_strided(shape, (1, 1, 1, 1)))
    for out in outs:
        with pytest.raises(ValueError, match="out has elements that share memory"):
            lib_fn(op)(x, *weights, out=out)


@pytest.mark.parametrize("op", ALL_OPS)
def test_strided_disjoint_out_still_works(op):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 5, 5, 4)).astype(np.float32)
    weights = _weights(op, rng, 3, 3, 4) if op != "pointwise" else _weights(op, rng, 1, 1, 4)
    want = lib_fn(op)(x, *weights)
    n, oh, ow, co = want.shape
    big = np.full((n, 2 * oh, ow, co), np.nan, np.float32)
    for out in (big[:, ::2], big[:, ::-2], np.full(want.shape[::-1], np.nan, np.float32).T):
        res = lib_fn(op)(x, *weights, out=out)
        assert res is out and bitwise_equal(np.ascontiguousarray(out), want)


# --------------------------------------------------------------------------------------------
# 4. exotic arrays: big-endian, masked arrays, torch meta / sparse / negative-bit views


def _optional_torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _op_args(op, rng, dtype=np.float32):
    x = rng.standard_normal((2, 6, 5, 4)).astype(dtype)
    k = (3, 3) if op != "pointwise" else (1, 1)
    weights = _weights(op, rng, *k, 4, dtype=dtype)
    c_out = weights[-1].shape[-1]
    bias = rng.standard_normal(c_out).astype(dtype)
    return x, weights, bias


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("op", ALL_OPS)
def test_big_endian_arrays_are_accepted(op, dtype):
    """'>f4'/'>f8' x, weights, bias and out give the native call's bits; inputs unchanged."""
    rng = np.random.default_rng(5)
    x, weights, bias = _op_args(op, rng, dtype)
    kw = geo_kwargs(op, padding="same", stride=2)
    want = lib_fn(op)(x, *weights, bias=bias, **kw)
    be = np.dtype(dtype).newbyteorder(">")
    xb, wb, bb = x.astype(be), tuple(w.astype(be) for w in weights), bias.astype(be)
    copies = [a.copy() for a in (xb, *wb, bb)]
    got = lib_fn(op)(xb, *wb, bias=bb, **kw)
    assert got.dtype == np.dtype(dtype) and bitwise_equal(got, want)
    out = np.full(want.shape, np.nan, be)
    assert lib_fn(op)(xb, *wb, bias=bb, out=out, **kw) is out
    assert np.array_equal(out.astype(dtype), want)
    for before, after in zip(copies, (xb, *wb, bb), strict=True):
        assert before.tobytes() == after.tobytes()


@pytest.mark.parametrize("op", ALL_OPS)
def test_masked_arrays_are_refused(op):
    rng = np.random.default_rng(6)
    x, weights, bias = _op_args(op, rng)
    masked = np.ma.masked_array
    with pytest.raises(TypeError, match="x is a NumPy masked array"):
        lib_fn(op)(masked(x, mask=x > 0), *weights)
    name = {"conv2d": "w", "depthwise": "dw", "pointwise": "pw", "separable": "dw"}[op]
    w0 = weights[0]
    with pytest.raises(TypeError, match=f"{name} is a NumPy masked array"):
        lib_fn(op)(x, masked(w0, mask=w0 > 0), *weights[1:])
    with pytest.raises(TypeError, match="bias is a NumPy masked array"):
        lib_fn(op)(x, *weights, bias=masked(bias, mask=bias > 0))
    out = lib_fn(op)(x, *weights)
    with pytest.raises(TypeError, match="out is a NumPy masked array"):
        lib_fn(op)(x, *weights, out=masked(np.empty_like(out)))  # out: refused with any mask


@pytest.mark.parametrize("op", ALL_OPS)
def test_torch_exotic_tensors(op):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    x, weights, bias = _op_args(op, rng)
    tx = torch.from_numpy(x)
    with pytest.raises(ValueError, match="x is a torch tensor on device 'meta'"):
        lib_fn(op)(torch.empty(x.shape, device="meta"), *weights)
    with pytest.raises(TypeError, match="x is a torch tensor with layout torch.sparse_coo"):
        lib_fn(op)(tx.to_sparse(), *weights)
    with pytest.raises(ValueError, match="bias is a torch tensor on device 'meta'"):
        lib_fn(op)(x, *weights, bias=torch.empty(bias.shape, device="meta"))
    # negative- and conjugate-bit views are resolved for reading
    want = lib_fn(op)(x, *weights, bias=bias)
    neg = torch.complex(torch.zeros_like(tx), -tx).conj().imag  # the value x, negative bit set
    assert neg.is_neg()
    assert bitwise_equal(lib_fn(op)(neg, *weights, bias=bias), want)
    tb = torch.from_numpy(bias)
    negb = torch.complex(torch.zeros_like(tb), -tb).conj().imag
    assert bitwise_equal(lib_fn(op)(x, *weights, bias=negb), want)
    # ... and refused for writing (a resolved copy would swallow the result)
    out = torch.zeros(want.shape, dtype=torch.complex64).conj().imag
    assert out.is_neg()
    with pytest.raises(ValueError, match="out is a lazily negated or conjugated torch view"):
        lib_fn(op)(x, *weights, out=out)
    with pytest.raises(ValueError, match="out is a torch tensor on device 'meta'"):
        lib_fn(op)(x, *weights, out=torch.empty(want.shape, device="meta"))
    with pytest.raises(TypeError, match="out is a torch tensor with layout"):
        lib_fn(op)(x, *weights, out=torch.zeros(want.shape).to_sparse())


# --------------------------------------------------------------------------------------------
# 5. no usable kernel cache: the kernels run uncached, with a warning naming NUMBA_CACHE_DIR


def _fresh_kernel():
    from numba_dsconv.cpu import _jit

    def twice(a):  # pragma: no cover - compiled
        return a * 2.0

    return _jit._jit(twice, parallel=False)


def test_no_cache_location_warns_and_runs(monkeypatch):
    from numba_dsconv.cpu import _jit

    monkeypatch.setattr(_jit._KernelCacheImpl, "_locator_classes", [])
    monkeypatch.setattr(_jit, "_warned", False)
    with pytest.warns(RuntimeWarning, match="NUMBA_CACHE_DIR"):
        fn = _fresh_kernel()
    assert fn(np.float32(3)) == 6


def test_unwritable_cache_warns_and_runs(monkeypatch, tmp_path):
    import numba
    from numba.core import caching

    from numba_dsconv.cpu import _jit

    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_jit, "_warned", False)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(caching.IndexDataCacheFile, "save", full_disk)
    fn = _fresh_kernel()
    with pytest.warns(RuntimeWarning, match="cannot be written.*NUMBA_CACHE_DIR"):
        assert fn(np.float64(2.5)) == 5.0
    monkeypatch.setattr(caching.IndexDataCacheFile, "load", full_disk)
    monkeypatch.setattr(_jit, "_warned", False)
    fn = _fresh_kernel()
    with pytest.warns(RuntimeWarning, match="cannot be read"):
        assert fn(np.float64(1.5)) == 3.0


# --------------------------------------------------------------------------------------------
# 6. the command line: a message and exit status 2, never a traceback; text printed literally


def _run_cli(argv, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--layer", "99"], "layer must be 1..11"),
        (["demo", "--layer", "x"], "layer"),
        (["demo", "--batch", "-1"], "--batch: must be >= 1"),
        (["demo", "--batch", "many"], "expected an integer"),
        (["demo", "--device", "tpu"], "device must be"),
        (["bench", "--layers", "1-999999999999"], "is not a range of suite layers"),
        (["bench", "--layers", "0"], "layer must be 1..11"),
        (["bench", "--repeat", "0"], "--repeat: must be >= 1"),
        (["bench", "--layers", "9", "--json", "/proc/no/such/dir/b.json"], "--json"),
        (["bench", "--layers", "9", "--plot", "/proc/no/such.png"], "--plot"),
    ],
)
def test_cli_bad_arguments(argv, message, capsys, tmp_path):
    code, out, err = _run_cli(argv, capsys)
    assert code == 2 and message in err, (out, err)


def test_cli_unwritable_output_fails_before_measuring(capsys, monkeypatch, tmp_path):
    from numba_dsconv import bench

    def never(**kwargs):
        raise AssertionError("measured before checking the output path")

    monkeypatch.setattr(bench, "run_bench", never)
    code, _, err = _run_cli(["bench", "--layers", "9", "--json", str(tmp_path)], capsys)
    assert code == 2 and "cannot write there" in err
    target = tmp_path / "new.json"
    with pytest.raises(AssertionError, match="measured before"):
        cli.main(["bench", "--layers", "9", "--json", str(target)])
    assert not target.exists()  # the check leaves no empty file behind


def test_cli_demo_cuda_without_gpu(capsys):
    from numba_dsconv import bench

    if bench.gpu_available():
        pytest.skip("a GPU (or the CUDA simulator) is available here")
    code, _, err = _run_cli(["demo", "--device", "cuda"], capsys)
    assert code == 2 and "device='cpu'" in err and "'numba-dsconv[cuda12]'" in err


@settings(max_examples=40, deadline=None, database=None)
@given(st.text(alphabet="[]/ab=:'\\ -", min_size=1, max_size=30))
def test_cli_messages_print_literally(text):
    """No rich markup anywhere: whatever an error says, brackets included, is printed."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        assert cli._error(text) == 2
    assert " ".join(text.split()) in " ".join(buf.getvalue().split())


def test_cli_console_prints_text_literally(capsys):
    """No markup, no emoji codes, no highlighting on the console every command prints to."""
    text = "wrote results:100:.json [bench] [red]x[/] :smile:"
    cli.console.print(text)
    assert text in capsys.readouterr().out


def test_cli_memory_error_is_a_message(capsys):
    code, _, err = _run_cli(["demo", "--batch", "1000000000"], capsys)
    assert code == 2 and "not enough memory" in err and "--batch" in err


def test_masked_array_without_masked_values_is_accepted():
    x = np.random.default_rng(9).standard_normal((1, 5, 5, 3)).astype(np.float32)
    k = np.ones((3, 3, 3), np.float32)
    want = nd.depthwise(x, k)
    for m in (np.ma.masked_array(x), np.ma.masked_array(x, mask=np.zeros(x.shape, bool))):
        assert bitwise_equal(nd.depthwise(m, k), want)


def test_cli_info_prints_brackets(capsys, monkeypatch):
    monkeypatch.setattr(cli, "_devices", lambda: ["cpu", "cuda:0 [bench] [/] [red]"])
    assert cli.main(["info"]) == 0
    assert "cuda:0 [bench] [/] [red]" in capsys.readouterr().out


@settings(max_examples=30, deadline=None, database=None)
@given(st.text(min_size=0, max_size=12))
def test_cli_types_never_raise(text):
    """The argparse types reject anything but what they accept with ArgumentTypeError (a
    usage message), never another exception."""
    for parse in (cli._count(1), cli._layer_number, cli._device):
        try:
            parse(text)
        except argparse.ArgumentTypeError:
            pass


# --------------------------------------------------------------------------------------------
# the same classes on every backend (the CUDA one under the simulator in CI)


@pytest.mark.parametrize("op", ALL_OPS)
def test_hostile_inputs_on_each_device(op, device):
    rng = np.random.default_rng(8)
    x, weights, bias = _op_args(op, rng)
    kw = geo_kwargs(op, padding=1)
    want = lib_fn(op)(x, *weights, bias=bias, device=device, **kw)
    # big-endian inputs: the native call's bits
    be = [a.astype(">f4") for a in (x, *weights, bias)]
    assert bitwise_equal(lib_fn(op)(*be[:-1], bias=be[-1], device=device, **kw), want)
    # masked arrays refused
    with pytest.raises(TypeError, match="x is a NumPy masked array"):
        lib_fn(op)(np.ma.masked_array(x, mask=x > 0), *weights, device=device)
    # an out= whose elements alias each other refused
    alias = next(_aliasing_outs(want.shape))
    with pytest.raises(ValueError, match="out has elements that share memory"):
        lib_fn(op)(x, *weights, bias=bias, out=alias, device=device, **kw)
    # big-endian device arrays (NumPy's byte order, which no CUDA kernel can type) refused
    if device == "cuda":
        from numba import cuda

        with pytest.raises(TypeError, match="x is a big-endian"):
            lib_fn(op)(cuda.to_device(be[0]), *weights, device=device)
        with pytest.raises(TypeError, match="out is a big-endian"):
            lib_fn(op)(x, *weights, bias=bias, out=cuda.to_device(want.astype(">f4")),
                       device=device, **kw)  # fmt: skip
    # geometry that would wrap a 64-bit index refused before any launch
    if op != "pointwise":
        with pytest.raises(ValueError, match="dilation="):
            lib_fn(op)(x, *weights, dilation=(5 * 10**18, 1), padding=((0, 10**19), (1, 1)),
                       device=device)  # fmt: skip
