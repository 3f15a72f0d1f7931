"""The NumPy fast path (api._FAST): a call with the types, shapes, strides, dtypes and keywords
of a call validated before skips validation. It must give what the full path gives, on new
values, and never let a call through that validation would stop."""

from __future__ import annotations

import numpy as np
import pytest
from cases import make_case
from helpers import ALL_OPS, bitwise_equal, check_against_reference, geo_kwargs, lib_fn

import numba_dsconv as nd
from numba_dsconv import api


def _case(rng, op, layout="NHWC", dtype=np.float32, channels=3):
    mult = 2 if op in ("depthwise", "separable") else 1
    x, weights, bias_kw, red = make_case(
        rng, op, n=2, h=7, w=6, c=channels, kh=3, kw=2, mult=mult, c_out=5, xdtype=dtype,
        layout=layout, batched=True, biases=True,
    )  # fmt: skip
    kwargs = dict(bias_kw, layout=layout, **geo_kwargs(op, stride=(2, 1), padding="same"))
    kwargs["activation"] = "relu6"
    return x, weights, kwargs, red


@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_a_remembered_call_computes_new_values(op, layout):
    rng = np.random.default_rng(7)
    x, weights, kwargs, red = _case(rng, op, layout)
    check_against_reference(op, x, weights, red, **kwargs)
    assert any(k[0] == op for k in api._FAST)  # the first call was remembered
    # new values, same shapes: the fast path runs them, and agrees with the reference
    x2, weights2, kwargs2, _ = _case(np.random.default_rng(8), op, layout)
    first = check_against_reference(op, x2, weights2, red, **kwargs2)
    # ... and with the full path (the memo emptied) to the bit
    saved = dict(api._FAST)
    api._FAST.clear()
    try:
        full = lib_fn(op)(x2, *weights2, **kwargs2)
    finally:
        api._FAST.update(saved)
    assert bitwise_equal(first, full)


@pytest.mark.parametrize("op", ALL_OPS)
def test_other_strides_and_dtypes_are_other_calls(op):
    rng = np.random.default_rng(9)
    x, weights, kwargs, red = _case(rng, op)
    check_against_reference(op, x, weights, red, **kwargs)
    # the same shape in another memory order, a strided view, float64: each checked afresh
    check_against_reference(op, np.asfortranarray(x), weights, red, **kwargs)
    wide = np.zeros((*x.shape[:3], 2 * x.shape[3]), x.dtype)
    wide[..., ::2] = x
    check_against_reference(op, wide[..., ::2], weights, red, **kwargs)
    x64, w64, kw64, _ = _case(rng, op, dtype=np.float64)
    out = check_against_reference(op, x64, w64, red, **kw64)
    assert out.dtype == np.float64


@pytest.mark.parametrize("op", ALL_OPS)
def test_bad_calls_after_a_good_one_still_fail(op):
    rng = np.random.default_rng(10)
    x, weights, kwargs, _ = _case(rng, op)
    fn = lib_fn(op)
    fn(x, *weights, **kwargs)
    fn(x, *weights, **kwargs)  # now from the memo
    bias = kwargs["bias"]
    with pytest.raises(ValueError, match="bias must have shape"):
        fn(x, *weights, **{**kwargs, "bias": np.concatenate([bias, bias])})
    with pytest.raises(TypeError, match="float32 or float64"):
        fn(x.astype(np.int32), *weights, **kwargs)
    with pytest.raises(ValueError, match="activation"):
        fn(x, *weights, **{**kwargs, "activation": "gelu"})
    if op != "pointwise":
        with pytest.raises(ValueError, match="stride"):
            fn(x, *weights, **{**kwargs, "stride": 0})
    # a list is not a memo key (True == 1 but only 1 is a valid stride): validated each time
    assert api._fast_key(op, (x,), ([1, 1],), None) is None
    assert api._fast_key(op, (x,), (True,), None) is None
    assert api._fast_key(op, (x.view(np.ma.MaskedArray),), (), None) is None
    assert api._fast_key(op, (x.astype(x.dtype.newbyteorder()),), (), None) is None
    read_only = np.empty(1)
    read_only.flags.writeable = False
    for out in (read_only, np.empty(1).view(np.ma.MaskedArray), [0.0]):  # out= too
        assert api._fast_key(op, (x,), (), out) is None


@pytest.mark.parametrize("op", ALL_OPS)
def test_a_plan_of_a_remembered_call_computes_nothing(op):
    """api.plan (the dask path's validation) of a call the fast path knows returns the Plan,
    not a result, also where the plan fails (the fast path asks whether a plan runs only while
    one does: api._PLANS), and the call computes again after it."""
    rng = np.random.default_rng(15)
    x, weights, kwargs, _ = _case(rng, op)
    fn = lib_fn(op)
    saved = dict(api._FAST)
    api._FAST.clear()
    expected = fn(x, *weights, **kwargs)  # remembered: the memo's one call
    (key,) = api._FAST
    real = api._FAST[key][4]
    assert real is not None  # a prepared launch (cpu.backend.prepared_launch)
    computed = []
    api._FAST[key] = (*api._FAST[key][:4], lambda *a: computed.append(1) or real(*a))
    try:
        got = api.plan(fn, x, tuple(weights), kwargs)
        assert isinstance(got, api.Plan) and got.spec.output_shape == expected.shape
        assert computed == [] and api._PLANS == 0
        with pytest.raises(ValueError, match="activation"):
            api.plan(fn, x, tuple(weights), {**kwargs, "activation": "gelu"})
        assert api._PLANS == 0
        assert bitwise_equal(fn(x, *weights, **kwargs), expected)
    finally:
        api._FAST.clear()
        api._FAST.update(saved)


def test_inputs_are_not_modified_on_the_fast_path():
    rng = np.random.default_rng(11)
    x, weights, kwargs, _ = _case(rng, "separable")
    copies = [a.copy() for a in (x, *weights)]
    for _ in range(3):
        lib_fn("separable")(x, *weights, **kwargs)
    for a, c in zip((x, *weights), copies, strict=True):
        assert bitwise_equal(a, c)


# the gradients' fast path (grad._FAST_GRAD)


def _grads(op, x, weights, kwargs, g, **extra):
    return getattr(nd, f"{op}_grad")(g, x, *weights, **kwargs, **extra)


@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("extra", ["output", "mask", "none"])
def test_a_remembered_gradient_call_computes_new_values(op, extra):
    from numba_dsconv import grad

    def problem(seed):
        rng = np.random.default_rng(seed)
        x, weights, kwargs, _ = _case(rng, op)
        y = lib_fn(op)(x, *weights, **kwargs)
        g = rng.standard_normal(y.shape).astype(y.dtype)
        more = {"output": {"output": y}, "mask": {"mask": (y > 0) & (y < 6)}, "none": {}}[extra]
        return x, weights, kwargs, g, more

    x, weights, kwargs, g, more = problem(12)
    _grads(op, x, weights, kwargs, g, **more)
    assert any(k[0] == f"{op}_grad" for k in grad._FAST_GRAD)  # remembered
    x2, weights2, kwargs2, g2, more2 = problem(13)
    fast = _grads(op, x2, weights2, kwargs2, g2, needs=None, **more2)
    saved = dict(grad._FAST_GRAD)
    grad._FAST_GRAD.clear()
    try:
        full = _grads(op, x2, weights2, kwargs2, g2, needs=None, **more2)
    finally:
        grad._FAST_GRAD.update(saved)
    for a, b in zip(fast, full, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert bitwise_equal(a, b) and a.shape == b.shape


def test_bad_gradient_calls_after_a_good_one_still_fail():
    rng = np.random.default_rng(14)
    x, weights, kwargs, _ = _case(rng, "separable")
    y = nd.separable(x, *weights, **kwargs)
    g = np.ones_like(y)
    for _ in range(2):  # the second from the memo
        _grads("separable", x, weights, kwargs, g, needs=("dw", "pw"))
    with pytest.raises(ValueError, match="needs names 'w'"):
        _grads("separable", x, weights, kwargs, g, needs=("w",))
    with pytest.raises(ValueError, match="grad must have the forward result's shape"):
        _grads("separable", x, weights, kwargs, g[:, :-1], needs=("dw", "pw"))
    with pytest.raises(ValueError, match="pass output or mask"):
        _grads("separable", x, weights, kwargs, g, needs=("dw", "pw"), output=y, mask=y > 0)
    from numba_dsconv import grad

    assert grad._grad_key("separable", (g,), (x,), (), ["dw"]) is None  # a list: validated


@pytest.mark.parametrize("op", ["separable", "pointwise"])
def test_remembered_weights_of_every_accepted_shape(op):
    """A memo keeps the weights' kernel shapes only where the call's own differ (a 4-D pw, a
    (K_h, K_w, C, M) dw): both kinds of remembered call compute what the full path computes."""
    rng = np.random.default_rng(11)
    x, weights, bias_kw, red = make_case(
        rng, op, n=2, h=7, w=6, c=3, kh=3, kw=2, mult=1, c_out=5, xdtype=np.float32,
        layout="NHWC", batched=True, biases=True,
    )  # fmt: skip
    kwargs = dict(bias_kw, **geo_kwargs(op, padding="same"))
    *dw, pw = weights
    pw2 = pw.reshape(pw.shape[-2:])
    plain = [*dw, pw2]  # the kernels' own shapes: (K_h, K_w, C), (C, C_out)
    four_d = [*dw, pw2.reshape(1, 1, *pw2.shape)]
    assert all(w.ndim == 3 for w in dw)
    api._FAST.clear()
    fn = lib_fn(op)
    for ws in (plain, four_d):
        first = check_against_reference(op, x, ws, red, **kwargs)
        again = fn(x * 2, *ws, **kwargs)  # from the memo, new values
        saved = dict(api._FAST)
        api._FAST.clear()
        try:
            assert bitwise_equal(again, fn(x * 2, *ws, **kwargs))
        finally:
            api._FAST.update(saved)
        assert bitwise_equal(first, fn(x, *weights, **kwargs))
    kept = [v[2] for k, v in api._FAST.items() if k[0] == op]
    assert set(kept) == {None, tuple(w.shape for w in plain)}  # (calls with and without device=)


@pytest.mark.parametrize("op", ALL_OPS)
def test_out_calls_take_the_fast_path_and_keep_every_check(op):
    """out= joins the memo key (its shape, strides, dtype); whether it overlaps an input is
    asked per call (a bounds test, the exact one where the bounds meet); a read-only out and
    an out that failed validation are never served from the memo."""
    rng = np.random.default_rng(12)
    x, weights, kwargs, red = _case(rng, op)
    fn = lib_fn(op)
    expected = fn(x, *weights, **kwargs)
    out = np.full_like(expected, np.nan)
    assert fn(x, *weights, **kwargs, out=out) is out
    assert any(k[0] == op and k[1][0] == "out" for k in api._FAST)  # remembered
    x2 = x * 2
    out2 = np.empty_like(expected)
    assert fn(x2, *weights, **kwargs, out=out2) is out2  # from the memo, new values
    saved = dict(api._FAST)
    api._FAST.clear()
    try:
        assert bitwise_equal(out2, fn(x2, *weights, **kwargs))
    finally:
        api._FAST.update(saved)
    assert bitwise_equal(out, expected)
    # an out of the same shape, strides and dtype over x's memory: refused, every time
    buf = np.zeros(x.size + expected.size, x.dtype)
    x_view = buf[: x.size].reshape(x.shape)
    x_view[...] = x
    over = buf[x.size // 2 : x.size // 2 + expected.size].reshape(expected.shape)
    assert x_view.strides == x.strides and over.strides == out.strides
    for _ in range(2):
        with pytest.raises(ValueError, match="overlaps the memory of x"):
            fn(x_view, *weights, **kwargs, out=over)
    read_only = np.empty_like(expected)
    fn(x, *weights, **kwargs, out=read_only)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        fn(x, *weights, **kwargs, out=read_only)
    wrong = np.empty((*expected.shape[:-1], expected.shape[-1] + 1), expected.dtype)
    for _ in range(2):  # not remembered after the first failure
        with pytest.raises(ValueError, match="out must have shape"):
            fn(x, *weights, **kwargs, out=wrong)


def test_a_full_memo_drops_its_oldest_call(monkeypatch):
    """Past _FAST_MAX call signatures the memo keeps the newest ones (it used to stop
    remembering: every later signature of a long process validated on every call)."""
    monkeypatch.setattr(api, "_FAST_MAX", 3)
    saved = dict(api._FAST)
    api._FAST.clear()
    try:
        rng = np.random.default_rng(13)
        for n in range(1, 6):  # five signatures: batch sizes 1-5
            x = rng.standard_normal((n, 5, 4, 3)).astype(np.float32)
            nd.pointwise(x, np.ones((3, 2), np.float32))
        batches = [k[1][0][0] for k in api._FAST if k[0] == "pointwise"]
        assert batches == [3, 4, 5]
    finally:
        api._FAST.clear()
        api._FAST.update(saved)


@pytest.mark.parametrize("op", ALL_OPS)
def test_prepared_launches(op, monkeypatch):
    """A remembered NumPy call that needs no conversion keeps its kernel launch prepared
    (cpu.backend.prepared_launch): later calls, batched or not, with or without out=, compute
    what the full path computes without CpuBackend.run; a change of the launch settings (the
    GEMM blocking, the thread count, the serial threshold) prepares the launch again; a call
    that needs a copy of x (a C-contiguous NCHW x) is remembered without a launch, an NCHW x
    in channels-last memory and weights in another memory order with one."""
    from numba_dsconv import _config
    from numba_dsconv.cpu import backend

    rng = np.random.default_rng(14)
    x, weights, kwargs, _ = _case(rng, op)
    kwargs["layout"] = "NHWC"
    fn = lib_fn(op)
    runs = []
    run = backend.CpuBackend.run
    monkeypatch.setattr(
        backend.CpuBackend, "run", staticmethod(lambda *a: runs.append(1) or run(*a))
    )
    saved = dict(api._FAST)
    api._FAST.clear()
    try:
        for xs in (x, x[0]):  # batched, then one image
            expected = fn(xs, *weights, **kwargs)
            out = np.empty_like(expected)
            fn(xs, *weights, **kwargs, out=out)
            assert all(v[4] is not None for k, v in api._FAST.items())
            runs.clear()
            xs2 = xs * 2
            got = fn(xs2, *weights, **kwargs)
            got_out = fn(xs2, *weights, **kwargs, out=out)
            assert runs == [] and got_out is out
            memo = dict(api._FAST)
            api._FAST.clear()
            full = fn(xs2, *weights, **kwargs)
            api._FAST.update(memo)
            assert bitwise_equal(got, full) and bitwise_equal(out, full)
        # the settings change: the launch prepares again (here: the serial build)
        runs.clear()
        serial = []
        k = backend.KERNELS[op]
        spy = k._replace(serial=lambda *a: serial.append(1) or k.serial(*a))
        monkeypatch.setitem(backend.KERNELS, op, spy)
        monkeypatch.setattr(_config, "SERIAL_MAX_MACS", 10**15)
        before = fn(x, *weights, **kwargs)
        assert runs == [] and len(serial) == 1
        assert bitwise_equal(fn(x, *weights, **kwargs), before) and len(serial) == 2
        memo = dict(api._FAST)
        api._FAST.clear()
        assert bitwise_equal(fn(x, *weights, **kwargs), before)  # the full path's bits
        api._FAST.update(memo)
        # a forked child (a new launch lock, _config._after_fork_in_child): the launch takes
        # the child's lock, not the one it was prepared with
        monkeypatch.setattr(_config, "SERIAL_MAX_MACS", -1)  # the parallel build again
        fn(x, *weights, **kwargs)
        runs.clear()
        held = []

        class Spy:
            def __enter__(self):
                held.append(1)

            def __exit__(self, *exc):
                return None

        monkeypatch.setattr(_config, "_WORKQUEUE_LOCK", Spy())
        monkeypatch.setattr(_config, "_LOCK_LAUNCHES", True)
        monkeypatch.setattr(_config, "_FORKS", _config._FORKS + 1)
        assert bitwise_equal(fn(x, *weights, **kwargs), before) and held == [1] and runs == []
        api._FAST.clear()
        x_nchw, weights_nchw, kwargs_nchw, _ = _case(rng, op, "NCHW")
        assert x_nchw.flags.c_contiguous
        fn(x_nchw, *weights_nchw, **kwargs_nchw)
        assert [v[4] for v in api._FAST.values()] == [None]  # an NHWC copy of x per call
        # NCHW in channels-last memory (torch's channels_last): NHWC views, prepared
        x_cl = np.ascontiguousarray(x_nchw.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
        first = fn(x_cl, *weights_nchw, **kwargs_nchw)
        assert api._FAST[list(api._FAST)[-1]][4] is not None
        runs.clear()
        got = fn(x_cl * 2, *weights_nchw, **kwargs_nchw)
        assert runs == [] and got.strides == first.strides
        api._FAST.clear()
        assert bitwise_equal(got, fn(x_cl * 2, *weights_nchw, **kwargs_nchw))
        # an NCHW x contiguous in both orders (one input channel): the general path returns the
        # result C-contiguous, so no launch is prepared and a repeat keeps the memory order
        api._FAST.clear()
        x1, weights1, kwargs1, _ = _case(rng, op, "NCHW", channels=1)
        assert x1.flags.c_contiguous and x1.transpose(0, 2, 3, 1).flags.c_contiguous
        first = fn(x1, *weights1, **kwargs1)
        assert [v[4] for v in api._FAST.values()] == [None]
        assert fn(x1 * 2, *weights1, **kwargs1).strides == first.strides
        # weights in Fortran order (torch's pointwise weight is a transposed view): converted
        # per call by the prepared launch, as the general path converts them
        weights_f = [np.asfortranarray(w) for w in weights]
        assert not any(w.flags.c_contiguous for w in weights_f if w.ndim > 1)
        api._FAST.clear()
        fn(x, *weights_f, **kwargs)
        assert api._FAST[list(api._FAST)[-1]][4] is not None
        runs.clear()
        got = fn(x * 2, *weights_f, **kwargs)
        assert runs == []
        api._FAST.clear()
        assert bitwise_equal(got, fn(x * 2, *weights_f, **kwargs))
        assert bitwise_equal(got, fn(x * 2, *weights, **kwargs))
    finally:
        api._FAST.clear()
        api._FAST.update(saved)
