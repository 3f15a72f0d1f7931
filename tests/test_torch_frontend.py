"""numba_dsconv.torch: the autograd ops and modules against torch itself.

Forward and gradients against F.conv2d (groups=C for depthwise) on every device, gradcheck in
float64 for every op and activation, torch.library.opcheck, torch.compile(fullgraph=True),
memory formats, a MobileNet-style stack trained for a few SGD steps beside the same stack of
torch layers, what autograd keeps, the modules' shapes, initialisation and from_torch, and the
core API's refusal of tensors that require grad.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import numba_dsconv as nd  # noqa: E402
import numba_dsconv.torch as ndt  # noqa: E402

ACTS = {None: lambda t: t, "relu": F.relu, "relu6": F.relu6}


def devices() -> list[str]:
    from helpers import SIMULATOR, cuda_usable

    return ["cpu"] + (["cuda"] if cuda_usable() and not SIMULATOR and torch.cuda.is_available()
                      else [])  # fmt: skip


DEVICES = devices()


def _pad(x, padding, k, stride, dilation):
    """torch's F.pad for our padding forms (TensorFlow's 'same' at any stride)."""
    import reference as ref

    (t, b), (left, r) = ref.normalize_padding(padding, tuple(x.shape[-2:]), k, stride, dilation)
    return F.pad(x, (left, r, t, b))


def torch_reference(op, x, weights, bias=None, dw_bias=None, stride=1, padding=0, dilation=1,
                    activation=None, mid_activation=None):  # fmt: skip
    """The op with torch's own layers."""
    if op == "pointwise":
        return ACTS[activation](F.conv2d(x, weights[0], bias))
    w = weights[0]
    xp = _pad(x, padding, tuple(w.shape[2:]), stride, dilation)
    groups = x.shape[-3] if op in ("depthwise", "separable") else 1
    b0 = dw_bias if op == "separable" else bias
    y = F.conv2d(xp, w, b0, stride=stride, dilation=dilation, groups=groups)
    if op == "separable":
        y = F.conv2d(ACTS[mid_activation](y), weights[1], bias)
    return ACTS[activation](y)


def ours(op, x, weights, **kw):
    if op == "separable":
        return ndt.separable(x, *weights, **kw)
    return getattr(ndt, op)(x, weights[0], **kw)


def make(op, n=2, c=4, h=9, w=8, k=(3, 3), mult=2, c_out=5, dtype=torch.float64, device="cpu",
         biases=True, seed=0):  # fmt: skip
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).to(device).requires_grad_()

    x = (3 * torch.randn(n, c, h, w, generator=g, dtype=dtype)).to(device).requires_grad_()
    if op == "separable":
        weights = (r(c * mult, 1, *k), r(c_out, c * mult, 1, 1))
        bs = {"dw_bias": r(c * mult), "bias": r(c_out)} if biases else {}
    elif op == "depthwise":
        weights = (r(c * mult, 1, *k),)
        bs = {"bias": r(c * mult)} if biases else {}
    elif op == "pointwise":
        weights = (r(c_out, c, 1, 1),)
        bs = {"bias": r(c_out)} if biases else {}
    else:
        weights = (r(c_out, c, *k),)
        bs = {"bias": r(c_out)} if biases else {}
    return x, weights, bs


OPS = ("separable", "depthwise", "pointwise", "conv2d")
GEOMETRIES = [
    {"stride": 1, "padding": 1, "dilation": 1},
    {"stride": 2, "padding": "same", "dilation": 1},
    {"stride": (2, 1), "padding": ((0, 2), (1, 0)), "dilation": (1, 2)},
    {"stride": 1, "padding": "valid", "dilation": 2},
    {"stride": 3, "padding": (1, 2), "dilation": 1},
]


def _geo(op, geo):
    return {} if op == "pointwise" else geo


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("op", OPS)
def test_forward_and_gradients_match_torch(op, fmt, dtype, device):
    for i, geo in enumerate(GEOMETRIES):
        for act in (None, "relu", "relu6"):
            x, weights, bs = make(op, dtype=dtype, device=device, seed=i)
            if fmt == "channels_last":
                x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
            kw = dict(_geo(op, geo), activation=act, **bs)
            if op == "separable":
                kw["mid_activation"] = {None: "relu6", "relu": None, "relu6": "relu"}[act]
            y = ours(op, x, weights, **kw)
            want = torch_reference(op, x, weights, **kw)
            tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {}
            torch.testing.assert_close(y, want, **tol)
            mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
            assert y.is_contiguous(memory_format=mf)
            g = torch.randn_like(want)
            leaves = (x, *weights, *bs.values())
            got = torch.autograd.grad(y, leaves, g)
            expected = torch.autograd.grad(want, leaves, g)
            for a, b in zip(got, expected, strict=True):
                assert a.shape == b.shape and a.dtype == b.dtype
                torch.testing.assert_close(a, b, **({"atol": 2e-3, "rtol": 1e-3} if dtype ==
                                                    torch.float32 else {}))  # fmt: skip


@pytest.mark.parametrize("c_out", [37, 64])
@pytest.mark.parametrize("op", ["separable", "pointwise"])
def test_small_tiles_and_wide_outputs(op, c_out, monkeypatch):
    """Tiles of a few pixels, more output channels than C*M and than a tile: the GEMMs of the
    backward on torch's (C_out, C*M) weights in place (the gradient of pw computed transposed;
    for the separable with C_out = 64 float64s, 40 pixels, C*M = 8 and no final activation,
    not: its grad rows lie 512 bytes apart, backward.transposed_dpw; the backward's sum over
    its chunks writes d pw in the weight's layout)."""
    from numba_dsconv import _config
    from numba_dsconv.cpu import backward

    monkeypatch.setattr(_config, "CPU_TILE_MAX_PIXELS", 6)
    monkeypatch.setattr(_config, "SERIAL_MAX_MACS", 0)
    x, weights, bs = make(op, n=2, c=4, h=9, w=7, mult=2, c_out=c_out, dtype=torch.float64)
    kw = dict(_geo(op, GEOMETRIES[1]), activation="relu" if c_out == 37 else None, **bs)
    orders = []
    real = backward.transposed_dpw

    def recorded(*args):
        orders.append(real(*args))
        return orders[-1]

    monkeypatch.setattr(backward, "transposed_dpw", recorded)
    y = ours(op, x, weights, **kw)
    want = torch_reference(op, x, weights, **kw)
    torch.testing.assert_close(y, want)
    g = torch.randn_like(y)
    leaves = (x, *weights, *bs.values())
    for a, b in zip(torch.autograd.grad(y, leaves, g), torch.autograd.grad(want, leaves, g),
                    strict=True):  # fmt: skip
        torch.testing.assert_close(a, b)
    assert orders == [not (op == "separable" and c_out == 64)]


@pytest.mark.parametrize("act", [None, "relu", "relu6"])
@pytest.mark.parametrize("op", OPS)
def test_gradcheck(op, act):
    """torch.autograd.gradcheck in float64 on small shapes (every argument, one geometry with
    stride, dilation and asymmetric padding), every activation (and mid activation)."""
    x, weights, bs = make(op, n=1, c=2, h=6, w=5, k=(3, 2), c_out=3)
    kw = dict(_geo(op, GEOMETRIES[2]), activation=act)
    if op == "separable":
        kw["mid_activation"] = {None: "relu", "relu": "relu6", "relu6": None}[act]
    names = list(bs)

    def f(x, *rest):
        ws = rest[: len(weights)]
        b = dict(zip(names, rest[len(weights) :], strict=True))
        return ours(op, x, ws, **kw, **b)

    assert torch.autograd.gradcheck(f, (x, *weights, *bs.values()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_opcheck(op, device):
    """torch.library.opcheck on each op (schema, autograd registration, fake tensors, eager
    vs compiled with dynamic shapes), several inputs, both memory formats."""
    fwd = getattr(torch.ops.numba_dsconv, op)
    for i, (geo, act, fmt) in enumerate([
        (GEOMETRIES[0], "relu", torch.contiguous_format),
        (GEOMETRIES[1], "relu6", torch.channels_last),
        (GEOMETRIES[2], None, torch.contiguous_format),
    ]):  # fmt: skip
        x, weights, bs = make(op, device=device, dtype=torch.float32, seed=i)
        x = x.detach().contiguous(memory_format=fmt).requires_grad_()
        s, mode, pads, d = ndt._geometry(**{"stride": 1, "padding": 0, "dilation": 1,
                                            **_geo(op, geo)})  # fmt: skip
        mid = "relu" if op == "separable" else "none"
        biases = [bs.get("dw_bias"), bs.get("bias")] if op == "separable" else [bs.get("bias")]
        args = (x, *weights, *biases, s, mode, pads, d, mid, act or "none")
        torch.library.opcheck(fwd, args)


def test_opcheck_backward_op():
    op = torch.ops.numba_dsconv.separable_backward
    x, weights, bs = make("separable", dtype=torch.float32)
    y = ndt.separable(x, *weights, padding=1, **bs, activation="relu")
    args = (torch.randn_like(y), x.detach(), *(w.detach() for w in weights), bs["dw_bias"].detach(),
            bs["bias"].detach(), (y > 0).detach(), [1, 1], "explicit", [1, 1, 1, 1], [1, 1],
            "none", "relu", [True, False, True, False, True])  # fmt: skip
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_model_matches_eager(device):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        ndt.Conv2d(3, 8, 3, stride=2, padding=1, activation="relu"),
        ndt.SeparableConv2d(8, 16, 3, padding=1, mid_activation="relu6", activation="relu"),
        ndt.DepthwiseConv2d(16, 16, 3, stride=2, padding="same", activation="relu6"),
        ndt.PointwiseConv2d(16, 10),
    ).to(device)
    x = torch.randn(2, 3, 17, 15, device=device).contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(model, fullgraph=True)
    y_eager = model(x)
    y_comp = compiled(x)
    torch.testing.assert_close(y_comp, y_eager)
    g_eager = torch.autograd.grad(y_eager.square().sum(), list(model.parameters()))
    g_comp = torch.autograd.grad(compiled(x).square().sum(), list(model.parameters()))
    for a, b in zip(g_comp, g_eager, strict=True):
        torch.testing.assert_close(a, b)


def _mobilenet(ours_: bool, widths, seed=0):
    """Depthwise separable layers with relu6 after each stage, ours or torch's, from the same
    initial weights."""
    torch.manual_seed(seed)
    layers = []
    for c_in, c_out, stride in widths:
        dw = torch.nn.Conv2d(c_in, c_in, 3, stride=stride, padding=1, groups=c_in, bias=True)
        pw = torch.nn.Conv2d(c_in, c_out, 1, bias=True)
        if ours_:
            layers.append(ndt.SeparableConv2d.from_torch(dw, pw, mid_activation="relu6",
                                                         activation="relu6"))  # fmt: skip
        else:
            layers += [dw, torch.nn.ReLU6(), pw, torch.nn.ReLU6()]
    return torch.nn.Sequential(*layers).double()


@pytest.mark.parametrize("device", DEVICES)
def test_training_steps_match_torch(device):
    """A MobileNet-style stack trained for a few SGD steps with our layers and with torch's,
    from the same initial weights and data: the same parameters at the end."""
    widths = [(8, 16, 1), (16, 32, 2), (32, 32, 1), (32, 64, 2)]
    a = _mobilenet(True, widths).to(device)
    b = _mobilenet(False, widths).to(device)
    start = [p.detach().clone() for p in a.parameters()]
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(4, 8, 16, 16, generator=gen, dtype=torch.float64) for _ in range(3)]
    targets = [torch.randn(4, 64, 4, 4, generator=gen, dtype=torch.float64) for _ in range(3)]
    for model in (a, b):
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        for x, t in zip(xs, targets, strict=True):
            x = x.to(device).contiguous(memory_format=torch.channels_last)
            opt.zero_grad()
            F.mse_loss(model(x), t.to(device)).backward()
            opt.step()
    # per layer, ours: dw_weight, pw_weight, dw_bias, bias (registration order); torch's
    # Conv2d pairs: dw.weight, dw.bias, pw.weight, pw.bias
    mine = [p for layer in a for p in (layer.dw_weight, layer.dw_bias, layer.pw_weight,
                                       layer.bias)]  # fmt: skip
    theirs = [p for m in b if isinstance(m, torch.nn.Conv2d) for p in (m.weight, m.bias)]
    assert len(mine) == len(theirs) == 4 * len(widths)
    for p, q in zip(mine, theirs, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-10)
    assert all(not torch.equal(p, s) for p, s in zip(a.parameters(), start, strict=True))


def test_autograd_keeps_no_intermediate():
    """What autograd saves for a separable layer at stride 2 (intermediate C*M x H/2 x W/2,
    neither x's shape nor the output's): x, the weights, biases, and a bool mask of the
    final activation; nothing of the intermediate's shape."""
    x, weights, bs = make("separable", n=2, c=4, h=12, w=12, mult=2, c_out=6, dtype=torch.float32)
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = ndt.separable(x, *weights, stride=2, padding=1, mid_activation="relu",
                          activation="relu6", **bs)  # fmt: skip
    mid_shape = (2, 8, 6, 6)
    assert mid_shape not in [s for s, _ in saved]
    assert (tuple(x.shape), torch.float32) in saved
    assert (tuple(y.shape), torch.bool) in saved  # the mask, not the output
    assert (tuple(y.shape), torch.float32) not in saved


def test_modules_shapes_and_initialisation():
    torch.manual_seed(3)
    layer = ndt.SeparableConv2d(6, 10, (3, 5), depth_multiplier=2, dw_bias=True)
    torch.manual_seed(3)
    dw = torch.nn.Conv2d(6, 12, (3, 5), groups=6, bias=True)
    pw = torch.nn.Conv2d(12, 10, 1)
    assert layer.dw_weight.shape == (12, 1, 3, 5) and layer.pw_weight.shape == (10, 12, 1, 1)
    for mine, theirs in ((layer.dw_weight, dw.weight), (layer.dw_bias, dw.bias),
                         (layer.pw_weight, pw.weight), (layer.bias, pw.bias)):  # fmt: skip
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    assert ndt.SeparableConv2d(4, 4, 3, bias=False).bias is None
    assert ndt.SeparableConv2d(4, 4, 3).dw_bias is None
    torch.manual_seed(4)
    d = ndt.DepthwiseConv2d(4, 8, 3)
    torch.manual_seed(4)
    td = torch.nn.Conv2d(4, 8, 3, groups=4)
    torch.testing.assert_close(d.weight, td.weight, rtol=0, atol=0)
    assert ndt.PointwiseConv2d(4, 7).weight.shape == (7, 4, 1, 1)
    assert ndt.Conv2d(3, 5, 3).weight.shape == (5, 3, 3, 3)
    assert "relu6" in repr(ndt.SeparableConv2d(4, 4, 3, activation="relu6"))


@pytest.mark.parametrize("device", DEVICES)
def test_from_torch(device):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 11, 10, device=device)
    dw = torch.nn.Conv2d(6, 12, 3, stride=2, padding=(1, 2), dilation=(1, 2), groups=6).to(device)
    pw = torch.nn.Conv2d(12, 7, 1, bias=False).to(device)
    sep = ndt.SeparableConv2d.from_torch(dw, pw, mid_activation="relu")
    torch.testing.assert_close(sep(x), pw(F.relu(dw(x))), atol=1e-5, rtol=1e-5)
    assert sep.bias is None and sep.dw_bias is not None
    torch.testing.assert_close(ndt.DepthwiseConv2d.from_torch(dw)(x), dw(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ndt.PointwiseConv2d.from_torch(pw, activation="relu")(dw(x)),
                               F.relu(pw(dw(x))), atol=1e-5, rtol=1e-5)  # fmt: skip
    full = torch.nn.Conv2d(6, 4, (3, 2), padding="same").to(device)
    torch.testing.assert_close(ndt.Conv2d.from_torch(full)(x), full(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="dw_conv must be a depthwise Conv2d"):
        ndt.SeparableConv2d.from_torch(full, pw)
    with pytest.raises(ValueError, match="pw_conv must be a 1x1 Conv2d"):
        ndt.SeparableConv2d.from_torch(dw, full)
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        ndt.Conv2d.from_torch(torch.nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect"))


def test_bad_arguments():
    x, weights, bs = make("separable", dtype=torch.float32)
    with pytest.raises(ValueError, match="padding must be"):
        ndt.separable(x, *weights, padding=-1)
    with pytest.raises(ValueError, match="activation must be None, 'relu' or 'relu6'"):
        ndt.separable(x, *weights, activation="gelu")
    with pytest.raises(ValueError, match="stride must be >= 1"):
        ndt.depthwise(x, weights[0], stride=0)
    with pytest.raises(ValueError, match="not a multiple of x's 4 channels"):
        ndt.depthwise(x, torch.randn(6, 1, 3, 3))
    with pytest.raises(ValueError, match="pointwise weight must be"):
        ndt.pointwise(x, torch.randn(5, 4, 3, 3))
    with pytest.raises(ValueError, match="must be a multiple of in_channels"):
        ndt.DepthwiseConv2d(4, 6, 3)


def test_core_api_refuses_tensors_that_require_grad():
    x, weights, _ = make("separable", dtype=torch.float32)
    core = (x.detach().permute(0, 2, 3, 1).requires_grad_(), torch.randn(3, 3, 4, 2),
            torch.randn(8, 5))  # fmt: skip
    with pytest.raises(TypeError, match="numba_dsconv.torch"):
        nd.separable(*core)
    with pytest.raises(TypeError, match="requires grad"):
        nd.separable(core[0].detach(), core[1].requires_grad_(), core[2])
    with torch.no_grad():
        y = nd.separable(*core)
    assert not y.requires_grad


# --------------------------------------------------------------------------------------------
# the eager path (a plain autograd.Function) against the custom op: the same bits


def _via_custom_op(op, x, weights, **kw):
    from unittest import mock

    with mock.patch.object(ndt, "_plain_eager", lambda tensors: False):
        return ours(op, x, weights, **kw)


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("op", OPS)
def test_eager_path_gives_the_custom_ops_bits(op, fmt):
    from unittest import mock

    calls = []
    real = ndt._EAGER[op].apply
    with mock.patch.object(ndt._EAGER[op], "apply", lambda *a: calls.append(1) or real(*a)):
        for act in (None, "relu6"):
            x, weights, bs = make(op, dtype=torch.float32, seed=3)
            if fmt == "channels_last":
                x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
            kw = dict(_geo(op, GEOMETRIES[1]), activation=act, **bs)
            leaves = (x, *weights, *bs.values())
            y1 = ours(op, x, weights, **kw)
            y2 = _via_custom_op(op, x, weights, **kw)
            assert y1.stride() == y2.stride() and torch.equal(y1, y2)
            g = torch.randn_like(y1)
            for a, b in zip(torch.autograd.grad(y1, leaves, g),
                            torch.autograd.grad(y2, leaves, g), strict=True):  # fmt: skip
                assert a.stride() == b.stride() and torch.equal(a, b)
    assert len(calls) == 2  # the eager path ran (twice), the custom op the other two


@pytest.mark.parametrize("path", ["eager", "custom op"])
def test_double_backward_fails_loudly(path):
    """A gradient taken with create_graph stays attached to the graph, and differentiating it
    again is an error (never a silent zero)."""
    x, weights, bs = make("separable", seed=4)
    fn = ours if path == "eager" else _via_custom_op
    y = fn("separable", x, weights, **bs)
    (gx,) = torch.autograd.grad(y.sum(), (x,), create_graph=True)
    assert gx.requires_grad
    with pytest.raises(RuntimeError, match="no autograd formula"):
        gx.sum().backward()


def test_meta_and_fake_tensors_take_the_custom_op():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.empty(2, 4, 9, 8, device="meta")
    dw, pw = torch.empty(8, 1, 3, 3, device="meta"), torch.empty(5, 8, 1, 1, device="meta")
    assert not ndt._plain_eager((x, dw, pw))
    y = ndt.separable(x, dw, pw, padding=1)
    assert y.device.type == "meta" and tuple(y.shape) == (2, 5, 9, 8)
    with FakeTensorMode():
        xf = torch.empty(2, 4, 9, 8)
        assert not ndt._plain_eager((xf,))
        yf = ndt.separable(xf, torch.empty(8, 1, 3, 3), torch.empty(5, 8, 1, 1), padding=1)
        assert tuple(yf.shape) == (2, 5, 9, 8)


def test_lazily_negated_views_forward_and_backward():
    """A tensor with torch's negative bit (a view NumPy cannot take) goes through the tensor
    path, with the values and gradients of the materialised negation."""
    torch.manual_seed(3)
    base = torch.randn(2, 4, 6, 6)
    dw = torch.randn(4, 1, 3, 3)
    pw = torch.randn(5, 4, 1, 1)
    grads = []
    for lazy in (True, False):
        x = base.clone().requires_grad_()
        xin = torch._neg_view(x) if lazy else -x
        assert xin.is_neg() == lazy
        y = ndt.separable(xin, dw, pw, padding=1, activation="relu")
        y.sum().backward()
        grads.append((y.detach(), x.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@pytest.mark.parametrize("op", OPS)
def test_prepared_calls_repeat_an_unprepared_call(op):
    """A later call of a signature runs what its first call prepared (``_PREPARED``: no new
    preparation) on its own tensors, with the bits, strides and gradients of a call prepared
    from scratch: NumPy views (float32 and float64, both memory formats, 'same' padding) and
    the tensor path (a lazily negated x)."""
    import gc
    import weakref
    from unittest import mock

    def step(seed, dtype, fmt, lazy, act):
        x, weights, bs = make(op, dtype=dtype, seed=seed)
        if fmt == "channels_last":
            x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
        xin = torch._neg_view(x) if lazy else x
        kw = dict(_geo(op, GEOMETRIES[1]), activation=act, **bs)
        y = ours(op, xin, weights, **kw)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
        return (y, *torch.autograd.grad(y, (x, *weights, *bs.values()), g))

    cases = [(torch.float32, "contiguous", False, None), (torch.float32, "channels_last",
             False, None), (torch.float32, "channels_last", True, None),
             (torch.float64, "channels_last", False, "relu6"), (torch.float32, "channels_last",
             True, "relu")]  # fmt: skip
    wants = []
    for case in cases:
        ndt._PREPARED.clear()
        step(0, *case)  # prepares the forward and the backward
        with (
            mock.patch.object(ndt, "_prepare_forward", side_effect=AssertionError),
            mock.patch.object(ndt, "_prepare_backward", side_effect=AssertionError),
        ):
            got = step(1, *case)
        ndt._PREPARED.clear()
        wants.append(step(1, *case))
        for a, b in zip(got, wants[-1], strict=True):
            assert a.stride() == b.stride() and torch.equal(a, b)
    # the signatures kept apart: cases differing only in memory format, negation, dtype or
    # activation, one after another with every preparation kept, twice over
    ndt._PREPARED.clear()
    for _ in range(2):
        for case, want in zip(cases, wants, strict=True):
            for a, b in zip(step(1, *case), want, strict=True):
                assert a.stride() == b.stride() and torch.equal(a, b)
    # what a call prepared keeps none of its tensors
    x, weights, bs = make(op, seed=2)
    ours(op, x, weights, **_geo(op, GEOMETRIES[0]), **bs).sum().backward()
    refs = [weakref.ref(t) for t in (x, *weights, *bs.values())]
    del x, weights, bs
    gc.collect()
    assert all(r() is None for r in refs)
