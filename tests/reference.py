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
