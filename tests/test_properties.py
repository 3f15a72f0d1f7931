"""Hypothesis: random configurations against the reference, and empty geometries rejected."""

from __future__ import annotations

import numpy as np
import pytest
from cases import make_case
from helpers import check_against_reference
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from reference import geometry

import numba_dsconv as nd

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

small = st.integers(1, 3)
pad = st.integers(0, 3)
pairs = st.one_of(small, st.tuples(small, small))
paddings = st.one_of(
    st.sampled_from(["valid", "same"]),
    pad,
    st.tuples(pad, pad),
    st.tuples(st.tuples(pad, pad), st.tuples(pad, pad)),
)
dtype_pairs = st.sampled_from(
    [(np.float32, np.float32), (np.float64, np.float64), (np.float32, np.float64)]
)
acts = st.sampled_from([None, "relu", "relu6"])


@st.composite
def configs(draw, op):
    batched = draw(st.booleans())
    cfg = dict(
        n=draw(st.integers(0, 2)) if batched else 1,
        h=draw(st.integers(1, 9)),
        w=draw(st.integers(1, 9)),
        c=draw(st.integers(1, 5)),
        kh=draw(st.integers(1, 5)),
        kw=draw(st.integers(1, 5)),
        mult=draw(st.integers(1, 3)) if op != "conv2d" else 1,
        c_out=draw(st.integers(1, 6)),
        layout=draw(st.sampled_from(["NHWC", "NCHW"])),
        batched=batched,
        biases=draw(st.booleans()),
    )
    cfg["xdtype"], cfg["wdtype"] = draw(dtype_pairs)
    geo = dict(stride=draw(pairs), padding=draw(paddings), dilation=draw(pairs))
    acts_kw = {"activation": draw(acts)}
    if op == "separable":
        acts_kw["mid_activation"] = draw(acts)
    seed = draw(st.integers(0, 2**32 - 1))
    return cfg, geo, acts_kw, seed


def _out_hw(cfg, geo):
    _, (oh, ow) = geometry((cfg["h"], cfg["w"]), (cfg["kh"], cfg["kw"]), **geo)
    return oh, ow


def _run(op, data):
    cfg, geo, acts_kw, seed = data
    oh, ow = _out_hw(cfg, geo)
    assume(oh > 0 and ow > 0)
    x, weights, bias_kw, red = make_case(np.random.default_rng(seed), op, **cfg)
    check_against_reference(op, x, weights, red, layout=cfg["layout"], **geo, **bias_kw, **acts_kw)


@SETTINGS
@given(configs("separable"))
def test_separable_random(data):
    _run("separable", data)


@SETTINGS
@given(configs("depthwise"))
def test_depthwise_random(data):
    _run("depthwise", data)


@SETTINGS
@given(configs("conv2d"))
def test_conv2d_random(data):
    _run("conv2d", data)


@SETTINGS
@given(
    n=st.integers(0, 2),
    h=st.integers(1, 6),
    w=st.integers(1, 6),
    c=st.integers(1, 8),
    c_out=st.integers(1, 8),
    layout=st.sampled_from(["NHWC", "NCHW"]),
    dtypes=dtype_pairs,
    biases=st.booleans(),
    activation=acts,
    seed=st.integers(0, 2**32 - 1),
)
def test_pointwise_random(n, h, w, c, c_out, layout, dtypes, biases, activation, seed):
    x, weights, bias_kw, red = make_case(
        np.random.default_rng(seed), "pointwise", n=n, h=h, w=w, c=c, c_out=c_out,
        xdtype=dtypes[0], wdtype=dtypes[1], layout=layout, biases=biases,
    )  # fmt: skip
    check_against_reference(
        "pointwise", x, weights, red, layout=layout, activation=activation, **bias_kw
    )


# ---------------------------------------------------------------------------------------------
# empty outputs are a ValueError (never an empty or garbage array)


@st.composite
def empty_geometries(draw):
    """A geometry where the dilated kernel does not fit the padded input in >= 1 dimension."""
    dims = []
    empty_dim = draw(st.sampled_from([0, 1, 2]))  # 2: both
    for axis in range(2):
        k, d = draw(st.integers(2, 5)), draw(st.integers(1, 3))
        span = (k - 1) * d + 1
        if axis == empty_dim or empty_dim == 2:
            before = draw(st.integers(0, (span - 2) // 2))
            after = draw(st.integers(0, span - 2 - before))
            size = draw(st.integers(1, span - 1 - before - after))  # size+pads < span
        else:
            before, after = draw(pad), draw(pad)
            size = draw(st.integers(span, span + 4))
        dims.append((size, k, d, before, after))
    (h, kh, dh, t, b), (w, kw, dw_, left, r) = dims
    stride = draw(pairs)
    if t == b and left == r and draw(st.booleans()):
        padding = (t, left) if (t, left) != (0, 0) else "valid"
    else:
        padding = ((t, b), (left, r))
    return h, w, kh, kw, stride, padding, (dh, dw_)


@SETTINGS
@given(empty_geometries(), st.sampled_from(["conv2d", "depthwise", "separable"]))
def test_empty_output_raises(geom, op):
    h, w, kh, kw, stride, padding, dilation = geom
    geo = dict(stride=stride, padding=padding, dilation=dilation)
    oh, ow = geometry((h, w), (kh, kw), **geo)[1]
    assert oh <= 0 or ow <= 0  # the strategy's own promise, checked by the reference
    x, weights, _, _ = make_case(np.random.default_rng(0), op, n=1, h=h, w=w, c=2, kh=kh, kw=kw)
    with pytest.raises(ValueError):
        getattr(nd, op)(x, *weights, device="cpu", **geo)
    with pytest.raises(ValueError):
        nd.cost((h, w, 2), (kh, kw), 3, **geo)
