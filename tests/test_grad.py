"""The gradient functions (numba_dsconv.<op>_grad) on every device: every case of the table
against the float64 reference's gradient formulas (tests/reference.py), with and without the
forward output, hypothesis over the whole geometry, ``needs``, determinism, bad inputs.

Tolerances: those of the forward (helpers.tolerances) with each gradient's own reduction
length, and the absolute part scaled by the size of that gradient's terms (the forward's
terms are products of unit normals; a gradient's terms carry the scale of what flows back).
A gradient is discontinuous where an activation's input sits on a kink (0, or 6 for relu6):
there float32 rounding, not the library, decides the mask, so such draws are redrawn.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import reference as ref
from cases import CASES, Case, params
from helpers import SIMULATOR, lib_fn, skip_slow_under_simulator, to_numpy, tolerances
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import numba_dsconv as nd
from numba_dsconv import _config

FIELDS = {
    "separable": ("x", "dw", "pw", "dw_bias", "bias"),
    "depthwise": ("x", "dw", "bias"),
    "pointwise": ("x", "pw", "bias"),
    "conv2d": ("x", "w", "bias"),
}
WEIGHTS = {"separable": ("dw", "pw"), "depthwise": ("dw",), "pointwise": ("pw",),
           "conv2d": ("w",)}  # fmt: skip


def grad_fn(op):
    return getattr(nd, f"{op}_grad")


def reduction_lengths(case: Case, pixels: int) -> dict[str, int]:
    """How many products each gradient element sums (the chain through both stages)."""
    taps = case.kh * case.kw
    co = case.c_out if case.op != "depthwise" else case.c * case.mult
    return {
        "separable": {"x": taps * case.mult * co, "dw": pixels * co, "pw": pixels * taps,
                      "dw_bias": pixels * co, "bias": pixels},
        "depthwise": {"x": taps * case.mult, "dw": pixels, "bias": pixels},
        "pointwise": {"x": co, "pw": pixels, "bias": pixels},
        "conv2d": {"x": taps * co, "w": pixels * case.c, "bias": pixels},
    }[case.op]  # fmt: skip


def _pre_activations(case: Case, x, weights, kwargs) -> list[tuple[np.ndarray, str]]:
    """(float64 values an activation takes, its name) for each activation of the call."""
    out = []
    plain = {k: v for k, v in kwargs.items() if k not in ("activation", "mid_activation")}
    if case.op == "separable" and kwargs.get("mid_activation"):
        geo = {k: plain[k] for k in ("stride", "padding", "dilation", "layout") if k in plain}
        mid = ref.ref_depthwise(x, weights[0], bias=plain.get("dw_bias"), **geo)
        out.append((mid, kwargs["mid_activation"]))
    if kwargs.get("activation"):
        if case.op == "separable":
            z = ref.ref_separable(x, *weights, mid_activation=kwargs.get("mid_activation"),
                                  **plain)  # fmt: skip
        else:
            z = getattr(ref, f"ref_{case.op}")(x, *weights, **plain)
        out.append((z, kwargs["activation"]))
    return out


def _on_a_kink(case: Case, x, weights, kwargs) -> bool:
    """Whether an activation's input lies within rounding reach of a kink (but not on it):
    16 units of roundoff per sqrt(reduction length), of the values' RMS (a sum of n products
    rounds to about sqrt(n) u of its terms' scale)."""
    u = np.finfo(case.result_dtype).eps / 2
    for v, act in _pre_activations(case, x, weights, kwargs):
        if not v.size:
            continue
        reach = 16 * u * math.sqrt(case.reduction_len) * float(np.sqrt(np.mean(v**2)))
        kinks = (0.0, 6.0) if act == "relu6" else (0.0,)
        for k in kinks:
            d = np.abs(v - k)
            # exactly on it: a window of padding only (no bias), exact in every precision
            if ((d <= reach) & (d > 0)).any():
                return True
    return False


def grad_problem(case: Case, rng: np.random.Generator):
    """(x, weights, kwargs, grad) of a case, drawn off the activations' kinks."""
    for _ in range(20):
        x, weights, kwargs = case.make(rng)
        if not _on_a_kink(case, x, weights, kwargs):
            break
    else:  # pragma: no cover - a case whose every draw sits on a kink is a broken case
        raise AssertionError(f"every draw of {case.id} puts an activation on a kink")
    y = lib_fn(case.op)(x, *weights, **kwargs)
    grad = rng.standard_normal(np.shape(y)).astype(np.asarray(y).dtype)
    return x, weights, kwargs, grad


def reference_grads(case: Case, x, weights, kwargs, grad) -> dict[str, np.ndarray | None]:
    out = getattr(ref, f"ref_{case.op}_grad")(grad, x, *weights, **kwargs)
    return dict(zip(FIELDS[case.op], out, strict=True))


def assert_grads_close(case: Case, got, expected: dict, pixels: int, given: dict) -> None:
    """Each field: None where its argument was None, else the argument's shape and dtype and
    the reference's values."""
    lengths = reduction_lengths(case, pixels)
    for name in FIELDS[case.op]:
        value = getattr(got, name)
        if given[name] is None:
            assert value is None, name
            continue
        actual = to_numpy(value)
        arg = np.asarray(given[name])
        assert actual.shape == arg.shape, (name, actual.shape, arg.shape)
        assert actual.dtype == arg.dtype, (name, actual.dtype, arg.dtype)
        want = expected[name]
        n = lengths[name]
        # the coarser of the computation's dtype and the gradient's own
        coarse = np.float32 if np.float32 in (actual.dtype, case.result_dtype) else np.float64
        rtol, atol = tolerances(coarse, n)
        term = float(np.sqrt(np.mean(want**2))) / math.sqrt(max(1, n)) if want.size else 0.0
        np.testing.assert_allclose(
            actual.astype(np.float64), want, rtol=rtol, atol=atol * term, equal_nan=True,
            err_msg=f"{case.id}: d/d{name}",
        )  # fmt: skip


def _pixels(case: Case, grad) -> int:
    """Output pixels over the batch."""
    channels = case.c_out if case.op != "depthwise" else case.c * case.mult
    return int(np.prod(np.shape(grad))) // channels


def given_args(case: Case, x, weights, kwargs) -> dict:
    names = WEIGHTS[case.op]
    return {"x": x, **dict(zip(names, weights, strict=True)),
            "dw_bias": kwargs.get("dw_bias"), "bias": kwargs.get("bias")}  # fmt: skip


def check_grads(case: Case, device: str, rng: np.random.Generator, with_output: bool) -> None:
    x, weights, kwargs, grad = grad_problem(case, rng)
    expected = reference_grads(case, x, weights, kwargs, grad)
    extra = {}
    if with_output:
        extra["output"] = lib_fn(case.op)(x, *weights, device=device, **kwargs)
    got = grad_fn(case.op)(grad, x, *weights, device=device, **kwargs, **extra)
    assert (
        type(got).__name__
        == {
            "separable": "SeparableGrads",
            "depthwise": "DepthwiseGrads",
            "pointwise": "PointwiseGrads",
            "conv2d": "Conv2dGrads",
        }[case.op]
    )
    assert_grads_close(
        case, got, expected, _pixels(case, grad), given_args(case, x, weights, kwargs)
    )
    for name in FIELDS[case.op]:  # NumPy in, NumPy out, whatever the device
        assert getattr(got, name) is None or isinstance(getattr(got, name), np.ndarray)


def skip_slow_grad_under_simulator(case: Case, device: str) -> None:
    """The simulator's sim-sized cases, but for the large standard convolutions (their
    gradient kernels loop over every tap and channel per thread: a minute each there)."""
    skip_slow_under_simulator(case, device)
    if device == "cuda" and SIMULATOR and case.op == "conv2d" and case.kh * case.kw >= 25:
        pytest.skip("too slow under the CUDA simulator (a GPU runs every case)")


@pytest.mark.parametrize("case", params(CASES))
def test_grads_against_reference(case, device, rng, monkeypatch):
    skip_slow_grad_under_simulator(case, device)
    if "parallel" in case.tags:
        monkeypatch.setattr(_config, "SERIAL_MAX_MACS", 0)  # the parallel CPU kernels
    check_grads(case, device, rng, with_output=False)


@pytest.mark.parametrize(
    "case",
    params([c for c in CASES if c.activation and {"activations", "torch", "small"} & c.tags]),
)
def test_grads_with_forward_output(case, device, rng):
    """The final activation's mask read from the forward's result instead of recomputed."""
    skip_slow_grad_under_simulator(case, device)
    check_grads(case, device, rng, with_output=True)


# --- hypothesis over the whole geometry ---------------------------------------------------------


@st.composite
def grad_cases(draw):
    op = draw(st.sampled_from(tuple(FIELDS)))
    kh, kw = (1, 1) if op == "pointwise" else (draw(st.integers(1, 7)), draw(st.integers(1, 7)))
    stride = draw(st.tuples(st.integers(1, 3), st.integers(1, 3)))
    dil = draw(st.tuples(st.integers(1, 2), st.integers(1, 2)))
    padding = draw(st.one_of(
        st.sampled_from(["valid", "same"]), st.integers(0, 3),
        st.tuples(st.tuples(st.integers(0, 3), st.integers(0, 3)),
                  st.tuples(st.integers(0, 3), st.integers(0, 3))),
    ))  # fmt: skip
    h = draw(st.integers(max(1, (kh - 1) * dil[0] + 1 - 6), 12))
    w = draw(st.integers(max(1, (kw - 1) * dil[1] + 1 - 6), 12))
    mult = draw(st.integers(1, 3)) if op in ("depthwise", "separable") else 1
    spatial = op != "pointwise"
    biases = [False, True, "bias"] + (["dw_bias"] if op == "separable" else [])
    acts = [None, "relu", "relu6"]
    case = Case(
        op, n=draw(st.integers(0, 3)), h=h, w=w, c=draw(st.integers(1, 20)), kh=kh, kw=kw,
        mult=mult, c_out=draw(st.integers(1, 40)),
        stride=stride if spatial else 1, padding=padding if spatial else "valid",
        dilation=dil if spatial else 1,
        xdtype=draw(st.sampled_from([np.float32, np.float64])),
        layout=draw(st.sampled_from(["NHWC", "NCHW"])), batched=draw(st.booleans()),
        biases=draw(st.sampled_from(biases)), activation=draw(st.sampled_from(acts)),
        mid_activation=draw(st.sampled_from(acts)) if op == "separable" else None,
        scale=draw(st.sampled_from([1.0, 3.0])), dw_4d=draw(st.booleans()),
    )  # fmt: skip
    try:
        nd.cost((h, w, case.c), (kh, kw), 1, stride=case.stride, padding=case.padding,
                dilation=case.dilation)  # fmt: skip
    except ValueError:
        assume(False)  # the kernel does not fit the padded input: no output
    return case, draw(st.booleans()), draw(st.booleans())


@settings(max_examples=40, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])  # fmt: skip
@given(grad_cases())
def test_grads_hypothesis(drawn):
    case, with_output, parallel = drawn
    old = _config.SERIAL_MAX_MACS
    _config.SERIAL_MAX_MACS = 0 if parallel else 10**12
    try:
        devices = ["cpu"] + (["cuda"] if _cuda_fast() else [])
        for device in devices:
            check_grads(case, device, np.random.default_rng(7), with_output=with_output)
    finally:
        _config.SERIAL_MAX_MACS = old


def _cuda_fast() -> bool:
    """A real GPU (the simulator is too slow for hypothesis' shapes)."""
    from helpers import cuda_usable

    return cuda_usable() and not SIMULATOR


# --- needs: what is skipped is not computed ------------------------------------------------


def _needs_case(op: str, stride: int | tuple[int, int] = (2, 1)) -> Case:
    mult = 2 if op in ("depthwise", "separable") else 1
    return Case(op, n=2, h=7, w=6, c=4, mult=mult, c_out=5, biases=True, padding="same",
                stride=stride, activation="relu",
                mid_activation="relu6" if op == "separable" else None)  # fmt: skip


# every op at stride (2, 1), and conv2d at stride 1 too: its d x then runs as a convolution
# (at other strides tap by tap)
NEEDS_OPS = [pytest.param(op, (2, 1), id=op) for op in FIELDS] + [
    pytest.param("conv2d", 1, id="conv2d-stride1")
]


@pytest.mark.parametrize(("op", "stride"), NEEDS_OPS)
def test_needs_returns_only_what_is_asked(op, stride, device, rng, monkeypatch):
    """Every subset of the fields: those asked for equal the full call's bit for bit (the
    chunking does not depend on needs), the others are None."""
    from itertools import combinations

    if device == "cuda" and stride == 1:
        pytest.skip("the CUDA backward's conv2d d x runs the same way at every stride")
    case = _needs_case(op, stride)
    x, weights, kwargs, grad = grad_problem(case, rng)
    monkeypatch.setattr(_config, "BACKWARD_CHUNKS", 3)  # several chunks: partial sums added
    monkeypatch.setattr(_config, "BACKWARD_MIN_PIXELS", 4)
    full = grad_fn(op)(grad, x, *weights, device=device, **kwargs)
    fields = FIELDS[op]
    subsets = [s for r in range(len(fields) + 1) for s in combinations(fields, r)]
    if device == "cuda" and SIMULATOR:  # (every subset takes minutes there)
        subsets = [(), *((f,) for f in fields), fields[:2], fields]
    for subset in subsets:
        got = grad_fn(op)(grad, x, *weights, device=device, needs=subset, **kwargs)
        for f in fields:
            if f in subset:
                want = to_numpy(getattr(full, f)).tobytes()
                assert to_numpy(getattr(got, f)).tobytes() == want, (subset, f)
            else:
                assert getattr(got, f) is None, (subset, f)
    one = grad_fn(op)(grad, x, *weights, device=device, needs="bias", **kwargs)
    assert one.x is None and to_numpy(one.bias).tobytes() == to_numpy(full.bias).tobytes()


@pytest.mark.parametrize(("op", "stride"), NEEDS_OPS)
def test_needs_skips_the_work(op, stride, rng, monkeypatch):
    """The CPU kernels are told to skip what is not needed: the backward kernel's flags and
    partial sums, and for conv2d which kernels run at all."""
    import inspect
    from itertools import combinations

    from numba_dsconv.cpu import backward

    launched = []
    real = backward._launch
    monkeypatch.setattr(backward, "_launch", lambda k, w, *a: (launched.append((k, a)),
                                                               real(k, w, *a)))  # fmt: skip
    case = _needs_case(op, stride)
    x, weights, kwargs, grad = grad_problem(case, rng)
    slot = {"separable": {"x": "x", "dw": "dw", "pw": "pw", "dw_bias": "db", "bias": "b"},
            "depthwise": {"x": "x", "dw": "dw", "bias": "db"},
            "pointwise": {"x": "x", "pw": "pw", "bias": "b"},
            "conv2d": {"x": "x", "w": "w", "bias": "b"}}[op]  # fmt: skip
    fields = FIELDS[op]
    for r in range(len(fields) + 1):
        for subset in combinations(fields, r):
            launched.clear()
            grad_fn(op)(grad, x, *weights, needs=subset, output=None, **kwargs)
            wanted = {slot[f] for f in subset}
            if op == "conv2d":
                names = [k.parallel.py_func.__name__ for k, _ in launched]
                taps = case.kh * case.kw
                x_taps = "x" in wanted and stride != 1  # else d x is one convolution
                assert names.count("pointwise_nhwc") == (taps if x_taps else 0), names
                # the forward again for the relu's mask (no output given), then d x's
                convs = bool(wanted) + ("x" in wanted and stride == 1)
                assert names.count("conv2d_nhwc") == convs, (subset, names)
                assert names.count("tap_rows") == (taps if "w" in wanted else 0), names
                assert ("conv2d_grad_bias_nhwc" in names) == ("b" in wanted), (subset, names)
                assert wanted or not launched, (subset, names)
                # d w: the pointwise backward's d pw GEMM tap by tap, asked for d pw alone
                gemms = [a for k, a in launched if k is backward.BACKWARD]
                assert len(gemms) == (taps if "w" in wanted else 0), (subset, names)
                for a in gemms:
                    named = dict(zip(inspect.signature(backward.backward_nhwc).parameters, a,
                                     strict=True))  # fmt: skip
                    flags = dict(zip(backward.FLAG_FIELDS, named["flags"], strict=True))
                    assert [f for f in flags if f.startswith("need_") and flags[f]] == [
                        "need_pw"
                    ], (subset, flags)
                continue
            if not wanted:
                assert not launched
                continue
            (kern, args), *rest = launched
            assert kern is backward.BACKWARD
            named = dict(zip(inspect.signature(backward.backward_nhwc).parameters, args,
                             strict=True))  # fmt: skip
            flags = dict(zip(backward.FLAG_FIELDS, named["flags"], strict=True))
            for s, flag in (("x", "need_x"), ("dw", "need_dw"), ("pw", "need_pw"),
                            ("db", "need_db"), ("b", "need_b")):  # fmt: skip
                assert flags[flag] == (s in wanted), (subset, flag)
            parts = {s: named[k] for s, k in (("pw", "gpw"), ("dw", "gdw"), ("db", "gdb"),
                                              ("b", "gb"))}  # fmt: skip
            for s, part in parts.items():
                # a partial-sum array where wanted, a one-element dummy where not
                assert (part.size > 1) == (s in wanted), (subset, s, part.shape)


# --- determinism -----------------------------------------------------------------------------


@pytest.mark.parametrize(("op", "stride"), NEEDS_OPS)
def test_same_bits_at_any_thread_count(op, stride, rng, monkeypatch):
    """Run after run, at 1 or 2 threads, and the serial build: the same bits (the chunks are
    cut from the problem alone and every sum runs in a fixed order)."""
    import numba

    case = replace_case(_needs_case(op, stride), n=3, h=23, w=19, c=20, c_out=24)
    x, weights, kwargs, grad = grad_problem(case, rng)
    monkeypatch.setattr(_config, "BACKWARD_MIN_PIXELS", 8)
    # the automatic cut (3 images on the pool: runs of rows, two phases), and 7 chunks
    for chunks in (0, 7):
        monkeypatch.setattr(_config, "BACKWARD_CHUNKS", chunks)
        monkeypatch.setattr(_config, "SERIAL_MAX_MACS", 0)
        first = grad_fn(op)(grad, x, *weights, **kwargs)
        runs = [grad_fn(op)(grad, x, *weights, **kwargs)]
        threads = numba.get_num_threads()
        try:
            numba.set_num_threads(1)
            runs.append(grad_fn(op)(grad, x, *weights, **kwargs))
        finally:
            numba.set_num_threads(threads)
        monkeypatch.setattr(_config, "SERIAL_MAX_MACS", 10**15)
        runs.append(grad_fn(op)(grad, x, *weights, **kwargs))
        for other in runs:
            for f in FIELDS[op]:
                assert getattr(other, f).tobytes() == getattr(first, f).tobytes(), (chunks, f)


def record_launch_arg(monkeypatch, name: str) -> list:
    """The list that every later CPU backward launch appends its argument ``name`` of
    backward_nhwc to (the launch still runs)."""
    import inspect

    from numba_dsconv.cpu import backward

    at = list(inspect.signature(backward.backward_nhwc).parameters).index(name)
    launched = []
    real = backward._launch
    monkeypatch.setattr(backward, "_launch", lambda k, w, *a: (launched.append(a[at]),
                                                               real(k, w, *a)))  # fmt: skip
    return launched


@pytest.mark.parametrize("op", ("separable", "depthwise", "pointwise"))
def test_backward_layout_follows_the_settings(op, rng, monkeypatch):
    """The chunks, tiles and tasks a call signature fixes are worked out once
    (cpu.backward.backward_layout) but again for every setting they depend on: the same call
    after BACKWARD_CHUNKS, the tile's pixels or the reduction block changed runs the new plan,
    and back (the split and the cut follow ROLE_SPLIT: the tests below)."""
    case = replace_case(_needs_case(op), n=3, h=13, w=11)
    x, weights, kwargs, grad = grad_problem(case, rng)
    monkeypatch.setattr(_config, "BACKWARD_MIN_PIXELS", 4)
    plans = record_launch_arg(monkeypatch, "plan")

    def plan() -> tuple:
        grad_fn(op)(grad, x, *weights, **kwargs)
        return plans[-1]

    first = plan()
    for name, value in (("BACKWARD_CHUNKS", 5), ("CPU_TILE_MAX_PIXELS", 8), ("CPU_GEMM_KC", 16)):
        with monkeypatch.context() as m:
            m.setattr(_config, name, value)
            changed = plan()
            assert changed != first, name
            if name == "BACKWARD_CHUNKS":
                assert changed[1] == 5
        assert plan() == first, name


@pytest.mark.parametrize("op", ("separable", "pointwise"))
@pytest.mark.parametrize("needs", [None, ("x", "pw"), ("dw", "bias"), ("pw",)])
def test_one_chunk_split_in_two_tasks_gives_the_same_bits(op, needs, rng, monkeypatch):
    """Too few pixels for a second chunk (N=1, a 7x7 output): the chunk runs as a d pw task
    and a dx task in parallel; every gradient equals, to the bit, the one-task run's, and the
    reference."""
    from numba_dsconv.cpu import backward

    if op == "pointwise" and needs is not None and "dw" in needs:
        needs = ("x", "bias")
    hw = 13 if op == "separable" else 7  # a 7x7 output (separable at stride 2)
    case = replace_case(_needs_case(op), n=1, h=hw, w=hw, c=40, c_out=72, stride=(2, 2))
    x, weights, kwargs, grad = grad_problem(case, rng)
    monkeypatch.setattr(_config, "SERIAL_MAX_MACS", 0)
    launched = record_launch_arg(monkeypatch, "split")
    split = grad_fn(op)(grad, x, *weights, needs=needs, **kwargs)
    import numba

    assert launched[-1] == (numba.config.NUMBA_NUM_THREADS > 1 and needs != ("pw",))
    monkeypatch.setattr(backward, "ROLE_SPLIT", False)
    whole = grad_fn(op)(grad, x, *weights, needs=needs, **kwargs)
    assert launched[-1] is False
    for f in FIELDS[op]:
        a, b = getattr(split, f), getattr(whole, f)
        assert (a is None) == (b is None), f
        if a is not None:
            assert a.tobytes() == b.tobytes(), f
    expected = reference_grads(case, x, weights, kwargs, grad)
    given = {f: (getattr(whole, f) if getattr(whole, f) is not None else None)
             for f in FIELDS[op]}  # fmt: skip
    assert_grads_close(case, split, expected, 1 * 7 * 7, given)


@pytest.mark.parametrize("dtype", (np.float32, np.float64))
@pytest.mark.parametrize("activation", (None, "relu6"))
@pytest.mark.parametrize("with_output", (False, True))
@pytest.mark.parametrize("needs", [None, ("x",), ("dw", "bias")])
@pytest.mark.parametrize("c, k", [(72, 3), (256, 3), (72, 5)])
def test_depthwise_one_chunk_cut_in_channels_gives_the_same_bits(
    c, k, dtype, activation, with_output, needs, rng, monkeypatch
):
    """The depthwise op's one chunk (N=1, 9 x 9) runs as two tasks on the input channels
    below and from ``cut``, C / 2 to the nearest whole pair of vectors: every gradient
    equals, to the bit, the one-task run's, and the float64 reference's. C = 72: a scalar
    tail in the second task where the vectors do not divide it; C = 256 float32: the 3x3
    sweep's two-vector dx (``dx3x3_pair``); 5 x 5: the general path."""
    from numba_dsconv.cpu import backward

    if activation is None and with_output:
        pytest.skip("the output matters only with an activation")
    case = Case("depthwise", n=1, h=9, w=9, c=c, kh=k, kw=k, biases=True, padding="same",
                xdtype=dtype, activation=activation, scale=3.0)  # fmt: skip
    x, weights, kwargs, grad = grad_problem(case, rng)
    extra = {"output": nd.depthwise(x, *weights, **kwargs)} if with_output else {}
    monkeypatch.setattr(_config, "SERIAL_MAX_MACS", 0)
    launched = record_launch_arg(monkeypatch, "cut")
    cut = nd.depthwise_grad(grad, x, *weights, needs=needs, **kwargs, **extra)
    import numba

    from numba_dsconv.cpu._simd import VEC_BYTES

    pair = 2 * VEC_BYTES // np.dtype(dtype).itemsize  # C / 2 to the nearest whole pair
    expected_cut = (c + pair) // (2 * pair) * pair if numba.config.NUMBA_NUM_THREADS > 1 else 0
    assert launched[-1] == expected_cut
    monkeypatch.setattr(backward, "ROLE_SPLIT", False)
    whole = nd.depthwise_grad(grad, x, *weights, needs=needs, **kwargs, **extra)
    assert launched[-1] == 0
    for f in FIELDS["depthwise"]:
        a, b = getattr(cut, f), getattr(whole, f)
        assert (a is None) == (b is None), f
        if a is not None:
            assert a.tobytes() == b.tobytes(), f
    expected = reference_grads(case, x, weights, kwargs, grad)
    given = given_args(case, x, weights, kwargs)
    given = {f: (given[f] if getattr(cut, f) is not None else None) for f in FIELDS["depthwise"]}
    assert_grads_close(case, cut, expected, 9 * 9, given)


def replace_case(case: Case, **fields) -> Case:
    from dataclasses import replace

    return replace(case, **fields)


def test_chunk_plans(monkeypatch):
    """The plans the determinism test relies on: two phases with chunks at least the
    kernel's reach apart, whole images (one phase) where they share out evenly, one chunk
    per thread of the pool (two with two phases)."""
    import numba

    from numba_dsconv.cpu.backward import backward_plan
    from numba_dsconv.cpu.pointwise import GEMM_MR

    pool = numba.config.NUMBA_NUM_THREADS
    monkeypatch.setattr(_config, "BACKWARD_MIN_PIXELS", 64)
    per, n, phases, tile, _ = backward_plan(3 * 23, 23, 19, 2, 1000, 100)
    if pool > 1:
        assert phases == 2 and per >= 2 and n == 2 * pool and tile % GEMM_MR == 0
    per, n, phases, _, _ = backward_plan(23 * 4 * pool, 23, 19, 2, 1000, 100)
    assert phases == 1 and per % 23 == 0 and n == pool
    assert backward_plan(1, 1, 1, 1, 10, 10)[:3] == (1, 1, 1)
    monkeypatch.setattr(_config, "BACKWARD_CHUNKS", 7)
    per, n, phases, _, _ = backward_plan(46, 23, 19, 2, 1000, 100)
    assert phases == 2 and n == 7 and per >= 2


@pytest.mark.parametrize("tile_pixels", [8, 16, 24])
@pytest.mark.parametrize("op", ("separable", "depthwise", "pointwise"))
def test_chunks_cut_into_even_tiles(op, tile_pixels, rng, monkeypatch):
    """A chunk's pixels run in tiles of even size within the tile budget (13 x 11 pixels per
    image, a tile of at most 16-48, BACKWARD_TILE_FACTOR x 8-24: tiles of 7 and 8 rows, a
    short last one), each tile's
    d pw added to the chunk's partial sums and dx rows zeroed as the tiles reach them."""
    monkeypatch.setattr(_config, "CPU_TILE_MAX_PIXELS", tile_pixels)
    monkeypatch.setattr(_config, "BACKWARD_MIN_PIXELS", 32)
    monkeypatch.setattr(_config, "SERIAL_MAX_MACS", 0)
    case = Case(op, n=3, h=13, w=11, c=5, mult=2 if op != "pointwise" else 1, c_out=9,
                stride=(2, 1) if op != "pointwise" else 1, padding="same", biases=True,
                activation="relu")  # fmt: skip
    check_grads(case, "cpu", rng, with_output=False)


# --- bad inputs ------------------------------------------------------------------------------


def _simple(op, rng):
    case = _needs_case(op)
    x, weights, kwargs, grad = grad_problem(case, rng)
    return x, weights, kwargs, grad


@pytest.mark.parametrize("op", tuple(FIELDS))
def test_bad_grad_and_output(op, rng):
    x, weights, kwargs, grad = _simple(op, rng)
    f = grad_fn(op)
    with pytest.raises(ValueError, match="grad must have the forward result's shape"):
        f(grad[:, :-1], x, *weights, **kwargs)
    with pytest.raises(TypeError, match="grad must be float32 or float64"):
        f(grad.astype(np.int32), x, *weights, **kwargs)
    with pytest.raises(TypeError, match="grad must be an array"):
        f(None, x, *weights, **kwargs)
    with pytest.raises(ValueError, match="output must have the forward result's shape"):
        f(grad, x, *weights, output=grad[:1], **kwargs)
    with pytest.raises(TypeError, match="output must be float32 or float64"):
        f(grad, x, *weights, output=grad.astype(int), **kwargs)


@pytest.mark.parametrize("op", tuple(FIELDS))
def test_bad_needs(op, rng):
    x, weights, kwargs, grad = _simple(op, rng)
    f = grad_fn(op)
    with pytest.raises(ValueError, match="needs names 'nope'"):
        f(grad, x, *weights, needs=("x", "nope"), **kwargs)
    with pytest.raises(TypeError, match="needs must be None, a field name or an iterable"):
        f(grad, x, *weights, needs=3, **kwargs)
    kwargs = dict(kwargs, bias=None)
    with pytest.raises(ValueError, match="needs names 'bias', but bias is None"):
        f(grad, x, *weights, needs=("bias",), **kwargs)
    assert f(grad, x, *weights, **kwargs).bias is None


@pytest.mark.parametrize("op", tuple(FIELDS))
def test_the_forward_errors(op, rng):
    """The forward's validation, word for word: a channel mismatch, a bad stride, a bad
    activation, an unknown device."""
    x, weights, kwargs, grad = _simple(op, rng)
    bad = [dict(kwargs, activation="gelu"), dict(kwargs, device="tpu")]
    if op != "pointwise":
        bad.append(dict(kwargs, stride=0))
    bad.append({**kwargs, "layout": "CHWN"})
    for kw in bad:
        with pytest.raises((ValueError, TypeError)) as forward:
            lib_fn(op)(x, *weights, **kw)
        with pytest.raises(type(forward.value), match=_escaped(forward.value)):
            grad_fn(op)(grad, x, *weights, **kw)
    with pytest.raises(ValueError) as forward:
        lib_fn(op)(x[..., :-1], *weights, **kwargs)
    with pytest.raises(ValueError, match=_escaped(forward.value)):
        grad_fn(op)(grad, x[..., :-1], *weights, **kwargs)


def _escaped(exc: BaseException) -> str:
    import re

    return re.escape(str(exc))


@pytest.mark.parametrize("op", tuple(FIELDS))
def test_inputs_are_not_modified(op, rng):
    x, weights, kwargs, grad = _simple(op, rng)
    y = lib_fn(op)(x, *weights, **kwargs)
    arrays = [x, *weights, grad, y] + [v for v in kwargs.values() if isinstance(v, np.ndarray)]
    before = [a.copy() for a in arrays]
    grad_fn(op)(grad, x, *weights, output=y, **kwargs)
    for a, b in zip(arrays, before, strict=True):
        assert a.tobytes() == b.tobytes()


def test_read_only_and_strided_inputs(rng):
    """Read-only, non-contiguous and NCHW-strided inputs give the same gradients."""
    case = _needs_case("separable")
    x, weights, kwargs, grad = grad_problem(case, rng)
    want = nd.separable_grad(grad, x, *weights, **kwargs)
    ro = [a.copy() for a in (grad, x, *weights)]
    for a in ro:
        a.flags.writeable = False
    got = nd.separable_grad(*ro, **kwargs)
    wide = np.zeros((*grad.shape[:-1], 2 * grad.shape[-1]), grad.dtype)
    wide[..., ::2] = grad
    got2 = nd.separable_grad(wide[..., ::2], np.asfortranarray(x), *weights, **kwargs)
    for f in FIELDS["separable"]:
        assert getattr(got, f).tobytes() == getattr(want, f).tobytes()
        assert getattr(got2, f).tobytes() == getattr(want, f).tobytes()


def test_dask_x_is_refused(rng):
    da = pytest.importorskip("dask.array")
    x, weights, kwargs, grad = _simple("separable", rng)
    with pytest.raises(TypeError, match="x is a dask array"):
        nd.separable_grad(grad, da.from_array(x), *weights, **kwargs)


# --- torch: the result type follows the input, and torch autograd judges too -----------------


def test_torch_tensors_in_torch_tensors_out(rng):
    torch = pytest.importorskip("torch")
    x, weights, kwargs, grad = _simple("separable", rng)
    want = nd.separable_grad(grad, x, *weights, **kwargs)
    t = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}
    got = nd.separable_grad(torch.from_numpy(grad), torch.from_numpy(x),
                            *(torch.from_numpy(w) for w in weights), **t)  # fmt: skip
    for f in FIELDS["separable"]:
        value = getattr(got, f)
        assert isinstance(value, torch.Tensor), f
        assert value.numpy().tobytes() == getattr(want, f).tobytes()


TORCH_CASES = [c for c in CASES if "torch" in c.tags or "activations" in c.tags]


@pytest.mark.parametrize("case", params(TORCH_CASES))
def test_grads_against_torch_autograd(case, device, rng):
    """The library's gradients against PyTorch autograd of F.conv2d (groups=C for the
    depthwise stage) on the same values in float64."""
    torch = pytest.importorskip("torch")
    from torch_helpers import torch_forward

    skip_slow_under_simulator(case, device)
    x, weights, kwargs, grad = grad_problem(case, rng)
    got = grad_fn(case.op)(grad, x, *weights, device=device, **kwargs)
    names = WEIGHTS[case.op]
    args = {"x": x, **dict(zip(names, weights, strict=True)),
            **{k: kwargs[k] for k in ("dw_bias", "bias") if k in kwargs}}  # fmt: skip
    leaves = {k: torch.tensor(np.asarray(v, np.float64), requires_grad=True)
              for k, v in args.items()}  # fmt: skip
    fkw = {k: v for k, v in kwargs.items() if k not in ("dw_bias", "bias")}
    fkw.setdefault("activation", None)
    if case.op == "separable":
        fkw.setdefault("mid_activation", None)
    if case.op != "pointwise":
        fkw.setdefault("dilation", 1)
    y = torch_forward(case.op, leaves["x"], tuple(leaves[k] for k in names),
                      {k: leaves[k] for k in ("dw_bias", "bias") if k in leaves}, fkw)  # fmt: skip
    (y * torch.from_numpy(np.asarray(grad, np.float64))).sum().backward()
    expected = {k: leaf.grad.numpy() for k, leaf in leaves.items()}
    expected.update({k: None for k in FIELDS[case.op] if k not in expected})
    assert_grads_close(
        case, got, expected, _pixels(case, grad), given_args(case, x, weights, kwargs)
    )


@pytest.mark.parametrize("n", [1, 4])
def test_results_do_not_share_scratch(n, rng):
    """The backward reuses scratch buffers call after call (its partial sums): a result must
    never be one of them, whatever the number of chunks (a single chunk's sums are copied)."""
    case = replace_case(_needs_case("separable"), n=n, c_out=40)
    x, weights, kwargs, grad = grad_problem(case, rng)
    for pw in (weights[1], np.asfortranarray(weights[1])):  # d pw computed in both orders
        first = nd.separable_grad(grad, x, weights[0], pw, **kwargs)
        kept = [a.copy() for a in first]
        nd.separable_grad(-3 * grad, 2 * x, weights[0], pw, **kwargs)
        for a, b in zip(first, kept, strict=True):
            assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("xdtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("chunks", [1, 3])
def test_dpw_of_an_f_ordered_pw_in_either_order_gives_the_same_bits(
    xdtype, n, chunks, rng, monkeypatch
):
    """d pw of an F-ordered pw (torch's weight) is computed transposed (gz^T A, in pw's memory
    order, each grad tile copied first where its rows lie a multiple of 512 bytes apart) unless
    those copies would exceed DPW_COPY_RATIO x d pw (the fused separable without a final
    activation: backward.transposed_dpw), then in the plain order, the chunks' sums added up
    (or the one chunk's copied) into d pw's transpose. Either way d pw is F-ordered like pw and
    sums the same products in the same order: every gradient the bits of the C-ordered pw's,
    right by the reference, in one chunk or several (run in parallel)."""
    monkeypatch.setattr(_config, "SERIAL_MAX_MACS", 0)
    if chunks > 1:
        monkeypatch.setattr(_config, "BACKWARD_MIN_PIXELS", 4)
        monkeypatch.setattr(_config, "BACKWARD_CHUNKS", chunks)
    lanes = 512 // np.dtype(xdtype).itemsize  # C_out whose grad rows lie 512 bytes apart
    orders = record_launch_arg(monkeypatch, "pw_t")
    # 48 pixels at N=2 (24 at N=1) and C*M = 8: above and below 4 x C*M; with a final
    # activation the tiles are copied (masked) in either order: transposed
    for c_out, act, transposed in ((lanes, None, n == 1), (lanes, "relu", True),
                                   (lanes + 16, None, True)):  # fmt: skip
        case = replace_case(_needs_case("separable"), n=n, c_out=c_out, xdtype=xdtype,
                            activation=act)  # fmt: skip
        x, weights, kwargs, grad = grad_problem(case, rng)
        want = nd.separable_grad(grad, x, *weights, **kwargs)  # a C-ordered pw
        assert orders[-1] is False
        fpw = np.asfortranarray(weights[1])
        got = nd.separable_grad(grad, x, weights[0], fpw, **kwargs)
        assert orders[-1] is transposed, (c_out, act, n)
        assert got.pw.flags.f_contiguous and want.pw.flags.c_contiguous
        for name, a, b in zip(FIELDS["separable"], got, want, strict=True):
            assert a.shape == b.shape and a.tobytes() == b.tobytes(), name  # (C-order bytes)
        expected = reference_grads(case, x, weights, kwargs, grad)
        given = given_args(case, x, (weights[0], fpw), kwargs)
        assert_grads_close(case, got, expected, _pixels(case, grad), given)


@pytest.mark.parametrize("chunks", [1, 3])
@pytest.mark.parametrize("op", ["separable", "pointwise"])
def test_dpw_summed_into_its_transpose_at_any_size(op, chunks, rng, monkeypatch):
    """d pw of an F-ordered pw computed in P's shape is summed over the chunks (or copied, one
    chunk) into its transpose by 32 x 32 blocks: sizes that cut the blocks in both directions
    (C*M 8 or 37, C_out 40 or 70) give the bits of the C-ordered pw's d pw, F-ordered; N=0
    gives F-ordered zeros."""
    from numba_dsconv.cpu import backward

    monkeypatch.setattr(_config, "SERIAL_MAX_MACS", 0)
    monkeypatch.setattr(_config, "BACKWARD_MIN_PIXELS", 4)
    monkeypatch.setattr(_config, "BACKWARD_CHUNKS", chunks)
    monkeypatch.setattr(backward, "transposed_dpw", lambda *args: False)  # the plain order
    orders = record_launch_arg(monkeypatch, "opw_t")
    for c, c_out in ((4, 40), (37, 70)):
        case = replace_case(_needs_case(op), c=c, c_out=c_out, activation=None)
        x, weights, kwargs, grad = grad_problem(case, rng)
        f = grad_fn(op)
        want = f(grad, x, *weights, **kwargs)
        fpw = np.asfortranarray(weights[-1])
        got = f(grad, x, *weights[:-1], fpw, **kwargs)
        assert orders[-2:] == [False, True]
        assert got.pw.flags.f_contiguous and not got.pw.flags.c_contiguous
        for name, a, b in zip(FIELDS[op], got, want, strict=True):
            assert a.shape == b.shape and a.tobytes() == b.tobytes(), name  # (C-order bytes)
        empty = f(grad[:0], x[:0], *weights[:-1], fpw, **kwargs)
        assert empty.pw.flags.f_contiguous and not empty.pw.any()


@pytest.mark.parametrize("op", ["separable", "depthwise", "conv2d"])
def test_bottom_padding_beyond_the_kernels_reach(op, device, rng, monkeypatch):
    """Output rows in a padding wider than the kernel read no input row: chunks (two phases)
    and bands that start there own no row of the next image, and no row past the end."""
    skip_slow_grad_under_simulator(Case(op, sim=True), device)
    monkeypatch.setattr(_config, "BACKWARD_CHUNKS", 4)
    monkeypatch.setattr(_config, "BACKWARD_MIN_PIXELS", 1)
    monkeypatch.setattr(_config, "SERIAL_MAX_MACS", 0)
    mult = 2 if op != "conv2d" else 1
    case = Case(op, n=3, h=4, w=5, c=3, mult=mult, c_out=4, padding=((0, 7), (1, 0)),
                stride=(2, 1), biases=True, activation="relu")  # fmt: skip
    check_grads(case, device, rng, with_output=False)


@pytest.mark.parametrize("op", tuple(FIELDS))
def test_mask_keyword(op, device, rng):
    """mask= (a bool array of where the final activation passes) gives the same bits as
    output= and as the recomputed forward; bad masks are refused."""
    case = _needs_case(op)
    x, weights, kwargs, grad = grad_problem(case, rng)
    f = grad_fn(op)
    y = lib_fn(op)(x, *weights, device=device, **kwargs)
    mask = y > 0
    with_mask = f(grad, x, *weights, device=device, mask=mask, **kwargs)
    for other in (f(grad, x, *weights, device=device, output=y, **kwargs),
                  f(grad, x, *weights, device=device, **kwargs)):  # fmt: skip
        for name in FIELDS[op]:
            assert to_numpy(getattr(with_mask, name)).tobytes() == to_numpy(
                getattr(other, name)).tobytes(), name  # fmt: skip
    with pytest.raises(ValueError, match="pass output or mask"):
        f(grad, x, *weights, output=y, mask=mask, **kwargs)
    with pytest.raises(TypeError, match="mask must be a bool array"):
        f(grad, x, *weights, mask=y, **kwargs)
    with pytest.raises(ValueError, match="mask must have the forward result's shape"):
        f(grad, x, *weights, mask=mask[:1], **kwargs)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("w", [5, 8, 13])
def test_depthwise_dx_two_vectors_per_pass(dtype, stride, w, rng):
    """dx where pixels lie 1 KiB or more apart (C = 256 float32, 128 float64: 4K aliasing)
    goes two channel vectors per pass (``backward.dx3x3_pair``): against float64, the
    depthwise and the fused separable backward, rows of 1 to 11 interior pixels."""
    c = 1024 // np.dtype(dtype).itemsize
    x = rng.uniform(-1, 1, (2, 6, w, c)).astype(dtype)
    dw = rng.uniform(-1, 1, (3, 3, c)).astype(dtype)
    pw = rng.uniform(-1, 1, (c, 16)).astype(dtype)
    kw = dict(stride=stride, padding=1)
    rtol, atol = tolerances(np.dtype(dtype), 9)  # a dx element sums at most 9 products
    y = nd.depthwise(x, dw, **kw)
    grad = rng.uniform(-1, 1, y.shape).astype(dtype)
    np.testing.assert_allclose(nd.depthwise_grad(grad, x, dw, **kw).x,
                               ref.ref_depthwise_grad(grad, x, dw, **kw)[0], rtol=rtol,
                               atol=atol)  # fmt: skip
    rtol, atol = tolerances(np.dtype(dtype), 9 * 16)  # 9 taps of gm, each 16 products
    out = nd.separable(x, dw, pw, **kw)
    grad = rng.uniform(-1, 1, out.shape).astype(dtype)
    got = nd.separable_grad(grad, x, dw, pw, needs=("x",), **kw)
    want = ref.ref_separable_grad(grad, x, dw, pw, **kw)
    np.testing.assert_allclose(got.x, want[0], rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("w", [5, 6, 7, 8, 13])
def test_depthwise_dx_at_stride_2_every_row_width(dtype, w, rng):
    """dx at stride 2 keeps each window's last column pending for the next window (the 3x3
    interior path): rows with 1 to 5 interior pixels, odd and even widths, against float64."""
    c = 40  # two whole vectors and a tail
    x = rng.uniform(-1, 1, (2, 7, w, c)).astype(dtype)
    dw = rng.uniform(-1, 1, (3, 3, c)).astype(dtype)
    kw = dict(stride=2, padding=1)
    y = nd.depthwise(x, dw, **kw)
    grad = rng.uniform(-1, 1, y.shape).astype(dtype)
    got = nd.depthwise_grad(grad, x, dw, **kw)
    want = ref.ref_depthwise_grad(grad, x, dw, **kw)
    rtol, atol = tolerances(np.dtype(dtype), 9)  # a dx element sums at most 9 products
    np.testing.assert_allclose(got.x, want[0], rtol=rtol, atol=atol)
    rtol, atol = tolerances(np.dtype(dtype), math.prod(y.shape[:3]))  # d dw: every pixel
    np.testing.assert_allclose(got.dw, want[1], rtol=rtol, atol=atol)


@pytest.mark.parametrize("mask_dtype", [np.float32, np.float64, np.uint8])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("act", [None, "relu", "relu6"])
def test_masked_copy_passes_the_activations_derivative(act, dtype, mask_dtype, rng):
    """The backward's mask of an activation (cpu.backward.masked_copy, by whole vectors and the
    row's last channels one by one) against NumPy: relu passes where m > 0, relu6 where
    0 < m < 6, none everywhere; at the kinks (0, 6), at -0.0 and at NaN nothing passes; a bool
    mask (uint8) passes where it is 1. Rows padded past their channels (as the tile buffers'
    are) and channel counts with and without a partial vector; the padding left untouched."""
    from numba_dsconv._spec import Activation
    from numba_dsconv.cpu.backward import masked_copy

    code = int({None: Activation.NONE, "relu": Activation.RELU, "relu6": Activation.RELU6}[act])
    special = [0.0, -0.0, 6.0, np.nan, np.inf, -np.inf, 5.999, 1e-30, -1e-30, 6.001]
    for channels in (1, 7, 16, 37, 64):
        rows = 5
        src = rng.standard_normal((rows, channels + 3)).astype(dtype)[:, :channels]
        if mask_dtype == np.uint8:
            mask = rng.integers(0, 2, (rows, channels)).astype(np.uint8)
            passes = mask == 1 if act else np.ones(mask.shape, bool)
        else:
            values = rng.uniform(-3, 9, rows * channels)
            k = min(len(special), values.size)
            values[:k] = special[:k]  # every special value where the rows hold them all
            mask = rng.permutation(values).reshape(rows, channels).astype(mask_dtype)
            passes = {None: np.ones(mask.shape, bool), "relu": mask > 0,
                      "relu6": (mask > 0) & (mask < 6)}[act]  # fmt: skip
        dst = np.full((rows, channels + 5), 7.0, dtype)
        before = src.copy(), mask.copy()
        masked_copy(src, mask, code, dst, rows)
        np.testing.assert_array_equal(dst[:, :channels], np.where(passes, src, 0))
        assert (dst[:, channels:] == 7).all()
        assert not np.signbit(dst[:, :channels][~passes]).any()  # +0, not -0 or a NaN's sign
        np.testing.assert_array_equal(src, before[0])
        np.testing.assert_array_equal(mask, before[1])
