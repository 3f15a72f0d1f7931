"""The float64 reference's gradient formulas (tests/reference.py, for the training issue),
checked against two judges nobody here wrote: central finite differences of the forward
reference (always), and PyTorch autograd of F.conv2d (groups=C for depthwise) where torch is
installed. Configurations by hypothesis: every op, layout, stride, dilation, padding form
(asymmetric and 'same' at any stride), depth multiplier, activation and bias, batched or not.
"""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

OPS = ("conv2d", "depthwise", "pointwise", "separable")
SETTINGS = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)


@st.composite
def configs(draw):
    op = draw(st.sampled_from(OPS))
    layout = draw(st.sampled_from(["NHWC", "NCHW"]))
    batched = draw(st.booleans())
    n = draw(st.integers(1, 2))
    c = draw(st.integers(1, 3))
    k = draw(st.tuples(st.integers(1, 3), st.integers(1, 3)))
    stride = draw(st.tuples(st.integers(1, 3), st.integers(1, 3)))
    dil = draw(st.tuples(st.integers(1, 2), st.integers(1, 2)))
    pad = draw(
        st.one_of(
            st.sampled_from(["valid", "same"]),
            st.integers(0, 2),
            st.tuples(st.tuples(st.integers(0, 2), st.integers(0, 2)),
                      st.tuples(st.integers(0, 2), st.integers(0, 2))),
        )
    )  # fmt: skip
    mult = draw(st.integers(1, 2)) if op in ("depthwise", "separable") else 1
    h = draw(st.integers((k[0] - 1) * dil[0] + 1, 7))
    w = draw(st.integers((k[1] - 1) * dil[1] + 1, 7))
    acts = {"activation": draw(st.sampled_from([None, "relu", "relu6"]))}
    if op == "separable":
        acts["mid_activation"] = draw(st.sampled_from([None, "relu", "relu6"]))
    return op, layout, batched, (n, h, w, c), k, stride, dil, pad, mult, acts


def _problem(cfg, seed=0):
    """x, weights (as given to the op), biases by name, kwargs, and grad = dL/d(result)."""
    op, layout, batched, (n, h, w, c), k, stride, dil, pad, mult, acts = cfg
    r = np.random.default_rng(seed)
    x = 3 * r.standard_normal((n, h, w, c))  # spread, so relu6 clips somewhere
    dw = r.standard_normal((*k, c, mult) if mult > 1 else (*k, c))
    pw = r.standard_normal((c * mult, 3))
    full = r.standard_normal((*k, c, 2))
    weights = {"conv2d": (full,), "depthwise": (dw,), "pointwise": (pw[:c],),
               "separable": (dw, pw)}[op]  # fmt: skip
    c_out = {"conv2d": 2, "depthwise": c * mult, "pointwise": 3, "separable": 3}[op]
    biases = {"bias": r.standard_normal(c_out)}
    if op == "separable":
        biases["dw_bias"] = r.standard_normal(c * mult)
    kwargs = dict(acts, layout=layout)
    if op != "pointwise":
        kwargs.update(stride=stride, dilation=dil, padding=pad)
    if layout == "NCHW":
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    if not batched:
        x = x[0]
    y = getattr(ref, f"ref_{op}")(x, *weights, **biases, **kwargs)
    grad = r.standard_normal(y.shape)
    return x, weights, biases, kwargs, grad


def _loss(op, grad, x, weights, biases, kwargs):
    return float((getattr(ref, f"ref_{op}")(x, *weights, **biases, **kwargs) * grad).sum())


def _grads(op, grad, x, weights, biases, kwargs):
    """The reference's gradients by argument name."""
    out = getattr(ref, f"ref_{op}_grad")(grad, x, *weights, **biases, **kwargs)
    names = {
        "conv2d": ("x", "w", "bias"),
        "depthwise": ("x", "dw", "bias"),
        "pointwise": ("x", "pw", "bias"),
        "separable": ("x", "dw", "pw", "dw_bias", "bias"),
    }
    return dict(zip(names[op], out, strict=True))  # fmt: skip


@SETTINGS
@given(configs())
def test_gradients_match_finite_differences(cfg):
    """d L / d theta . v = (L(theta + eps v) - L(theta - eps v)) / (2 eps) for a random
    direction v of every argument (L = sum(grad * result))."""
    op = cfg[0]
    x, weights, biases, kwargs, grad = _problem(cfg)
    g = _grads(op, grad, x, weights, biases, kwargs)
    names = {"conv2d": ("w",), "depthwise": ("dw",), "pointwise": ("pw",),
             "separable": ("dw", "pw")}[op]  # fmt: skip
    args = {"x": x, **dict(zip(names, weights, strict=True)), **biases}
    r = np.random.default_rng(1)
    eps = 1e-6
    for name, value in args.items():
        v = r.standard_normal(np.shape(value))

        def at(delta, name=name, v=v):
            moved = {**args, name: args[name] + delta * v}
            return _loss(op, grad, moved["x"], tuple(moved[k] for k in names),
                         {k: moved[k] for k in biases}, kwargs)  # fmt: skip

        numeric = (at(eps) - at(-eps)) / (2 * eps)
        analytic = float((g[name] * v).sum())
        assert g[name].shape == np.shape(value), name
        assert abs(numeric - analytic) <= 1e-6 * (1 + abs(analytic)), (name, numeric, analytic)


@SETTINGS
@given(configs())
def test_gradients_match_torch_autograd(cfg):
    torch = pytest.importorskip("torch")
    op = cfg[0]
    x, weights, biases, kwargs, grad = _problem(cfg)
    g = _grads(op, grad, x, weights, biases, kwargs)
    names = {"conv2d": ("w",), "depthwise": ("dw",), "pointwise": ("pw",),
             "separable": ("dw", "pw")}[op]  # fmt: skip
    leaves = {name: torch.tensor(a, dtype=torch.float64, requires_grad=True)
              for name, a in {"x": x, **dict(zip(names, weights, strict=True)),
                              **biases}.items()}  # fmt: skip
    from torch_helpers import torch_forward

    y = torch_forward(op, leaves["x"], tuple(leaves[k] for k in names),
                       {k: leaves[k] for k in biases}, kwargs)  # fmt: skip
    np.testing.assert_allclose(
        y.detach().numpy(),
        getattr(ref, f"ref_{op}")(x, *weights, **biases, **kwargs),
        rtol=1e-12,
        atol=1e-12,
    )
    (y * torch.from_numpy(grad)).sum().backward()
    for name, leaf in leaves.items():
        np.testing.assert_allclose(g[name], leaf.grad.numpy(), rtol=1e-10, atol=1e-10,
                                   err_msg=name)  # fmt: skip


@pytest.mark.parametrize("act", [None, "relu", "relu6"])
@pytest.mark.parametrize("op", OPS)
def test_every_op_and_activation(op, act):
    """A fixed strided, dilated, asymmetrically padded case per op and activation (the mid
    activation too), through both judges: hypothesis may not draw every combination."""
    acts = {"activation": act}
    if op == "separable":
        acts["mid_activation"] = {None: "relu6", "relu": "relu", "relu6": None}[act]
    mult = 2 if op in ("depthwise", "separable") else 1
    cfg = (op, "NCHW", True, (2, 7, 6, 3), (3, 2), (2, 1), (1, 2), ((1, 0), (2, 1)), mult, acts)
    test_gradients_match_finite_differences.hypothesis.inner_test(cfg)
    if pytest.importorskip("torch"):
        test_gradients_match_torch_autograd.hypothesis.inner_test(cfg)
