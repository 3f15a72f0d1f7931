"""Float64 reference implementation: the judge the tests compare the library against.

Written straight from the formulas of the contract, slow and obvious on purpose: zero padding
(read pixel by pixel, any size), then plain loops over output pixels and kernel taps (NumPy
only vectorises over the batch and the channels). It does not import numba_dsconv.

Formulas (NHWC per image; indices into the zero-padded input):
    standard:   Y[i,j,k]     = sum_m sum_n sum_c X[i*s+m*d, j*s+n*d, c] * W[m,n,c,k]
    depthwise:  Y[i,j,c*M+q] = sum_m sum_n X[i*s+m*d, j*s+n*d, c] * D[m,n,c,q]
    pointwise:  Z[i,j,k]     = sum_c Y[i,j,c] * P[c,k]
    separable:  activation(pointwise(mid_activation(depthwise(X) + dw_bias)) + bias)
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np


def as_pair(value) -> tuple[int, int]:
    """An int or an (h, w) pair as (h, w)."""
    if isinstance(value, (tuple, list)):
        h, w = value
        return int(h), int(w)
    return int(value), int(value)


def same_padding(size: int, k: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow 'SAME' padding (before, after) of one spatial dimension.

    out = ceil(size / stride); total = max(0, (out-1)*stride + (k-1)*dilation + 1 - size);
    before = total // 2 and the odd extra row/column goes after (bottom/right).
    """
    out = -(-size // stride)
    total = max(0, (out - 1) * stride + (k - 1) * dilation + 1 - size)
    return total // 2, total - total // 2


def normalize_padding(padding, hw, khw, stride, dilation):
    """Any accepted padding spelling -> ((top, bottom), (left, right))."""
    sh, sw = as_pair(stride)
    dh, dw = as_pair(dilation)
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0), (0, 0)
        if padding == "same":
            return same_padding(hw[0], khw[0], sh, dh), same_padding(hw[1], khw[1], sw, dw)
        raise ValueError(f"unknown padding {padding!r}")
    if isinstance(padding, int):
        return (padding, padding), (padding, padding)
    ph, pw = padding
    if isinstance(ph, int):
        return (ph, ph), (pw, pw)
    return (int(ph[0]), int(ph[1])), (int(pw[0]), int(pw[1]))


def output_size(size: int, k: int, stride: int, dilation: int, before: int, after: int) -> int:
    """Output length of one dimension; <= 0 means the output would be empty."""
    span = (k - 1) * dilation + 1
    return (size + before + after - span) // stride + 1


def geometry(hw, khw, *, stride=1, padding="valid", dilation=1):
    """(pads, (out_h, out_w)) for an (H, W) input and a (K_h, K_w) kernel (no validation)."""
    pads = normalize_padding(padding, hw, khw, stride, dilation)
    sh, sw = as_pair(stride)
    dh, dw = as_pair(dilation)
    oh = output_size(hw[0], khw[0], sh, dh, *pads[0])
    ow = output_size(hw[1], khw[1], sw, dw, *pads[1])
    return pads, (oh, ow)


def activate(y: np.ndarray, activation) -> np.ndarray:
    """None | 'relu' | 'relu6'. NaN < 0 and NaN > 6 are both False, so NaN stays NaN."""
    if activation is None:
        return y
    if activation == "relu":
        return np.where(y < 0, 0.0, y)
    if activation == "relu6":
        return np.where(y < 0, 0.0, np.where(y > 6, 6.0, y))
    raise ValueError(f"unknown activation {activation!r}")


# ---------------------------------------------------------------------------------------------
# layout: everything below works on batched NHWC float64


def _to_nhwc(x, layout):
    x = np.array(x, dtype=np.float64)  # a float64 copy; float32 values convert exactly
    batched = x.ndim == 4
    if not batched:
        x = x[None]
    if layout == "NCHW":
        x = x.transpose(0, 2, 3, 1)
    return x, batched


def _from_nhwc(y, layout, batched):
    if layout == "NCHW":
        y = y.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(y if batched else y[0])


class _Padded:
    """Batched NHWC x inside its zero padding, read one padded pixel at a time (Python-int
    coordinates, so a geometry of any size, say a padding of 2**64, needs no padded copy)."""

    def __init__(self, x, top, left):
        self.x, self.top, self.left = x, top, left

    def pixel(self, r, c):
        """The padded input at row r, column c: (N, C_in); zeros on the padding."""
        r, c = r - self.top, c - self.left
        if 0 <= r < self.x.shape[1] and 0 <= c < self.x.shape[2]:
            return self.x[:, r, c, :]
        return np.zeros((self.x.shape[0], self.x.shape[3]))


def _padded_and_size(x, khw, stride, padding, dilation):
    """Batched NHWC x with its zero padding, and the output size."""
    ((top, _), (left, _)), (oh, ow) = geometry(
        x.shape[1:3], khw, stride=stride, padding=padding, dilation=dilation
    )
    if oh <= 0 or ow <= 0:
        raise ValueError("the output would be empty")
    return _Padded(x, top, left), oh, ow


def _finish(y, bias, activation):
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float64)
    return activate(y, activation)


# ---------------------------------------------------------------------------------------------
# the four operations (same keyword arguments as the library, minus device/out)


def _conv2d_nhwc(x, w, stride, padding, dilation):
    kh, kw, _, c_out = w.shape
    s, t = as_pair(stride)
    d, e = as_pair(dilation)
    xp, oh, ow = _padded_and_size(x, (kh, kw), stride, padding, dilation)
    y = np.zeros((x.shape[0], oh, ow, c_out))
    for i in range(oh):
        for j in range(ow):
            for m in range(kh):
                for n in range(kw):
                    pixel = xp.pixel(i * s + m * d, j * t + n * e)  # (N, C_in)
                    y[:, i, j, :] += (pixel[:, :, None] * w[m, n]).sum(axis=1)
    return y


def _depthwise_nhwc(x, dw, stride, padding, dilation):
    if dw.ndim == 3:
        dw = dw[..., None]
    kh, kw, c_in, mult = dw.shape
    s, t = as_pair(stride)
    d, e = as_pair(dilation)
    xp, oh, ow = _padded_and_size(x, (kh, kw), stride, padding, dilation)
    y = np.zeros((x.shape[0], oh, ow, c_in, mult))
    for i in range(oh):
        for j in range(ow):
            for m in range(kh):
                for n in range(kw):
                    pixel = xp.pixel(i * s + m * d, j * t + n * e)  # (N, C_in)
                    y[:, i, j, :, :] += pixel[:, :, None] * dw[m, n]  # (N, C_in, M)
    return y.reshape(x.shape[0], oh, ow, c_in * mult)  # channel c*M + q


def _pointwise_nhwc(x, pw):
    if pw.ndim == 4:
        pw = pw[0, 0]
    return (x[..., :, None] * pw).sum(axis=-2)  # Z[..., k] = sum_c Y[..., c] * P[c, k]


def ref_conv2d(
    x, w, *, stride=1, padding="valid", dilation=1, bias=None, activation=None, layout="NHWC"
):
    x, batched = _to_nhwc(x, layout)
    y = _conv2d_nhwc(x, np.asarray(w, np.float64), stride, padding, dilation)
    return _from_nhwc(_finish(y, bias, activation), layout, batched)


def ref_depthwise(
    x, dw, *, stride=1, padding="valid", dilation=1, bias=None, activation=None, layout="NHWC"
):
    x, batched = _to_nhwc(x, layout)
    y = _depthwise_nhwc(x, np.asarray(dw, np.float64), stride, padding, dilation)
    return _from_nhwc(_finish(y, bias, activation), layout, batched)


def ref_pointwise(x, pw, *, bias=None, activation=None, layout="NHWC"):
    x, batched = _to_nhwc(x, layout)
    y = _pointwise_nhwc(x, np.asarray(pw, np.float64))
    return _from_nhwc(_finish(y, bias, activation), layout, batched)


def ref_separable(
    x,
    dw,
    pw,
    *,
    stride=1,
    padding="valid",
    dilation=1,
    dw_bias=None,
    mid_activation=None,
    bias=None,
    activation=None,
    layout="NHWC",
):
    x, batched = _to_nhwc(x, layout)
    mid = _depthwise_nhwc(x, np.asarray(dw, np.float64), stride, padding, dilation)
    mid = _finish(mid, dw_bias, mid_activation)
    y = _pointwise_nhwc(mid, np.asarray(pw, np.float64))
    return _from_nhwc(_finish(y, bias, activation), layout, batched)


# ---------------------------------------------------------------------------------------------
# gradients (the training issue): straight from the forward formulas by the chain rule.
# ``grad`` is dL/d(result), in the result's layout; every gradient comes back in its argument's
# shape (x in its layout, the weights as given). Activation derivatives follow torch: relu
# passes where y > 0, relu6 where 0 < y < 6 (strictly), none everywhere.


def activation_mask(y: np.ndarray, activation) -> np.ndarray:
    """d act(y) / dy (0 or 1), y the pre-activation value."""
    if activation is None:
        return np.ones_like(y)
    if activation == "relu":
        return (y > 0).astype(np.float64)
    if activation == "relu6":
        return ((y > 0) & (y < 6)).astype(np.float64)
    raise ValueError(f"unknown activation {activation!r}")


def _geometry_nhwc(x, khw, stride, padding, dilation):
    ((top, _), (left, _)), (oh, ow) = geometry(
        x.shape[1:3], khw, stride=stride, padding=padding, dilation=dilation
    )
    return top, left, oh, ow


def _taps(x, khw, stride, padding, dilation):
    """(i, j, m, q, r, c) for every output pixel and tap whose input pixel (r, c) lies inside
    x (taps on the zero padding contribute nothing to any gradient)."""
    top, left, oh, ow = _geometry_nhwc(x, khw, stride, padding, dilation)
    s, t = as_pair(stride)
    d, e = as_pair(dilation)
    for i in range(oh):
        for j in range(ow):
            for m in range(khw[0]):
                for q in range(khw[1]):
                    r, c = i * s + m * d - top, j * t + q * e - left
                    if 0 <= r < x.shape[1] and 0 <= c < x.shape[2]:
                        yield i, j, m, q, r, c


def _depthwise_backward(x, dw, gy, stride, padding, dilation):
    """(dL/dx, dL/ddw) of Y[n,i,j,c*M+q] = sum_{m,k} X[n, i*s+m*d, j*t+k*e, c] D[m,k,c,q],
    gy = dL/dY (NHWC, (N, OH, OW, C*M)); dw (K_h, K_w, C) or (K_h, K_w, C, M)."""
    d4 = dw if dw.ndim == 4 else dw[..., None]
    kh, kw, c_in, mult = d4.shape
    g = gy.reshape(*gy.shape[:3], c_in, mult)
    gx = np.zeros_like(x)
    gd = np.zeros_like(d4)
    for i, j, m, q, r, c in _taps(x, (kh, kw), stride, padding, dilation):
        gx[:, r, c, :] += (g[:, i, j] * d4[m, q]).sum(axis=-1)  # sum over the multiplier
        gd[m, q] += (x[:, r, c, :, None] * g[:, i, j]).sum(axis=0)  # sum over the batch
    return gx, gd.reshape(dw.shape)


def _conv2d_backward(x, w, gy, stride, padding, dilation):
    """(dL/dx, dL/dw) of Y[n,i,j,k] = sum_{m,q,c} X[n, i*s+m*d, j*t+q*e, c] W[m,q,c,k]."""
    kh, kw = w.shape[:2]
    gx = np.zeros_like(x)
    gw = np.zeros_like(w)
    for i, j, m, q, r, c in _taps(x, (kh, kw), stride, padding, dilation):
        gx[:, r, c, :] += gy[:, i, j] @ w[m, q].T
        gw[m, q] += x[:, r, c, :].T @ gy[:, i, j]
    return gx, gw


def _bias_grad(b, gy):
    return None if b is None else gy.sum(axis=(0, 1, 2))


def _grad_nhwc(grad, layout, batched):
    g = np.array(grad, dtype=np.float64)
    if not batched:
        g = g[None]
    return g.transpose(0, 2, 3, 1) if layout == "NCHW" else g


def _spatial_grad(forward, backward, grad, x, w, stride, padding, dilation, bias, activation,
                  layout):  # fmt: skip
    """(dL/dx, dL/dw, dL/dbias) of act(forward(x, w) + bias), given grad = dL/d(result)."""
    xn, batched = _to_nhwc(x, layout)
    wn = np.asarray(w, np.float64)
    y = _finish(forward(xn, wn, stride, padding, dilation), bias, None)
    gy = _grad_nhwc(grad, layout, batched) * activation_mask(y, activation)
    gx, gw = backward(xn, wn, gy, stride, padding, dilation)
    return _from_nhwc(gx, layout, batched), gw, _bias_grad(bias, gy)


def ref_depthwise_grad(
    grad, x, dw, *, stride=1, padding="valid", dilation=1, bias=None, activation=None,
    layout="NHWC",
):  # fmt: skip
    """(dL/dx, dL/ddw, dL/dbias) of ref_depthwise."""
    return _spatial_grad(_depthwise_nhwc, _depthwise_backward, grad, x, dw, stride, padding,
                         dilation, bias, activation, layout)  # fmt: skip


def ref_conv2d_grad(
    grad, x, w, *, stride=1, padding="valid", dilation=1, bias=None, activation=None,
    layout="NHWC",
):  # fmt: skip
    """(dL/dx, dL/dw, dL/dbias) of ref_conv2d."""
    return _spatial_grad(_conv2d_nhwc, _conv2d_backward, grad, x, w, stride, padding, dilation,
                         bias, activation, layout)  # fmt: skip


def ref_pointwise_grad(grad, x, pw, *, bias=None, activation=None, layout="NHWC"):
    """(dL/dx, dL/dpw, dL/dbias) of ref_pointwise: Z = X P, so dX = dZ P^T, dP = X^T dZ."""
    xn, batched = _to_nhwc(x, layout)
    p = np.asarray(pw, np.float64)
    p2 = p[0, 0] if p.ndim == 4 else p
    y = _finish(_pointwise_nhwc(xn, p2), bias, None)
    gy = _grad_nhwc(grad, layout, batched) * activation_mask(y, activation)
    gx = gy @ p2.T
    gp = np.einsum("nhwc,nhwk->ck", xn, gy)
    return _from_nhwc(gx, layout, batched), gp.reshape(p.shape), _bias_grad(bias, gy)


def ref_separable_grad(
    grad, x, dw, pw, *, stride=1, padding="valid", dilation=1, dw_bias=None,
    mid_activation=None, bias=None, activation=None, layout="NHWC",
):  # fmt: skip
    """(dL/dx, dL/ddw, dL/dpw, dL/ddw_bias, dL/dbias) of ref_separable, by the chain rule
    through activation(pointwise(mid_activation(depthwise(x) + dw_bias)) + bias)."""
    xn, batched = _to_nhwc(x, layout)
    d = np.asarray(dw, np.float64)
    p = np.asarray(pw, np.float64)
    p2 = p[0, 0] if p.ndim == 4 else p
    y1 = _finish(_depthwise_nhwc(xn, d, stride, padding, dilation), dw_bias, None)
    a = activate(y1, mid_activation)
    y2 = _finish(_pointwise_nhwc(a, p2), bias, None)
    g2 = _grad_nhwc(grad, layout, batched) * activation_mask(y2, activation)
    gp = np.einsum("nhwc,nhwk->ck", a, g2)
    g1 = (g2 @ p2.T) * activation_mask(y1, mid_activation)
    gx, gd = _depthwise_backward(xn, d, g1, stride, padding, dilation)
    return (_from_nhwc(gx, layout, batched), gd, gp.reshape(p.shape),
            _bias_grad(dw_bias, g1), _bias_grad(bias, g2))  # fmt: skip


# ---------------------------------------------------------------------------------------------
# cost model


def ref_cost(
    input_shape, kernel_size, c_out, *, stride=1, padding="valid", dilation=1, depth_multiplier=1
):
    """MACs and weight counts (biases excluded) of standard vs depthwise-separable conv."""
    n = input_shape[0] if len(input_shape) == 4 else 1
    h, w, c_in = input_shape[-3:]
    kh, kw = as_pair(kernel_size)
    mult = depth_multiplier
    _, (oh, ow) = geometry((h, w), (kh, kw), stride=stride, padding=padding, dilation=dilation)
    if oh <= 0 or ow <= 0:
        raise ValueError("the output would be empty")
    pixels = n * oh * ow
    macs = {
        "standard": pixels * kh * kw * c_in * c_out,
        "depthwise": pixels * kh * kw * c_in * mult,
        "pointwise": pixels * c_in * mult * c_out,
    }
    macs["separable"] = macs["depthwise"] + macs["pointwise"]
    params = {
        "standard": kh * kw * c_in * c_out,
        "separable": kh * kw * c_in * mult + c_in * mult * c_out,
    }
    # a plain namespace of the same field names as the library's record, compared field by field
    return SimpleNamespace(
        output_shape=(oh, ow, c_out) if len(input_shape) == 3 else (n, oh, ow, c_out),
        mac_ratio=macs["separable"] / macs["standard"],
        param_ratio=params["separable"] / params["standard"],
        **{f"{k}_macs": v for k, v in macs.items()},
        **{f"{k}_params": v for k, v in params.items()},
    )
