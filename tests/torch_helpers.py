"""The four operations spelled with torch.nn.functional.conv2d (float64, NHWC in and out).

Import only after ``pytest.importorskip("torch")``. Padding is applied with F.pad so that the
asymmetric TensorFlow 'same' and explicit ((top, bottom), (left, right)) forms are exact.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from reference import activate, as_pair, normalize_padding


def _nchw(x):
    """NHWC (batched or not) numpy -> batched NCHW float64 tensor."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 3:
        x = x[None]
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(y, batched):
    y = y.numpy().transpose(0, 2, 3, 1)
    return np.ascontiguousarray(y if batched else y[0])


def _pad(xt, khw, stride, padding, dilation):
    (top, bottom), (left, right) = normalize_padding(
        padding, tuple(xt.shape[2:]), khw, stride, dilation
    )
    return F.pad(xt, (left, right, top, bottom))


def _bias_act(y, bias, activation):
    if bias is not None:
        y = y + torch.from_numpy(np.asarray(bias, np.float64)).reshape(1, -1, 1, 1)
    return torch.from_numpy(activate(y.numpy(), activation))


def torch_conv2d(x, w, *, stride=1, padding="valid", dilation=1, bias=None, activation=None):
    w = np.asarray(w, np.float64)
    xt = _pad(_nchw(x), w.shape[:2], stride, padding, dilation)
    wt = torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1)))  # (C_out, C_in, kh, kw)
    y = F.conv2d(xt, wt, stride=as_pair(stride), dilation=as_pair(dilation))
    return _nhwc(_bias_act(y, bias, activation), np.ndim(x) == 4)


def _torch_depthwise_nchw(xt, dw, stride, padding, dilation):
    dw = np.asarray(dw, np.float64)
    if dw.ndim == 3:
        dw = dw[..., None]
    kh, kw, c_in, mult = dw.shape
    xt = _pad(xt, (kh, kw), stride, padding, dilation)
    # groups=C_in: output channel c*M+q is the q-th filter of group c, i.e. D[:, :, c, q]
    wt = torch.from_numpy(np.ascontiguousarray(dw.reshape(kh, kw, c_in * mult).transpose(2, 0, 1)))
    wt = wt[:, None]  # (C_in*M, 1, kh, kw)
    return F.conv2d(xt, wt, stride=as_pair(stride), dilation=as_pair(dilation), groups=c_in)


def _torch_pointwise_nchw(yt, pw):
    pw = np.asarray(pw, np.float64)
    if pw.ndim == 4:
        pw = pw[0, 0]
    wt = torch.from_numpy(np.ascontiguousarray(pw.T))[:, :, None, None]  # (C_out, C_in, 1, 1)
    return F.conv2d(yt, wt)


def torch_depthwise(x, dw, *, stride=1, padding="valid", dilation=1, bias=None, activation=None):
    y = _torch_depthwise_nchw(_nchw(x), dw, stride, padding, dilation)
    return _nhwc(_bias_act(y, bias, activation), np.ndim(x) == 4)


def torch_pointwise(x, pw, *, bias=None, activation=None):
    y = _torch_pointwise_nchw(_nchw(x), pw)
    return _nhwc(_bias_act(y, bias, activation), np.ndim(x) == 4)


def torch_separable(x, dw, pw, *, stride=1, padding="valid", dilation=1, dw_bias=None,
                    mid_activation=None, bias=None, activation=None):  # fmt: skip
    mid = _torch_depthwise_nchw(_nchw(x), dw, stride, padding, dilation)
    mid = _bias_act(mid, dw_bias, mid_activation)
    y = _torch_pointwise_nchw(mid, pw)
    return _nhwc(_bias_act(y, bias, activation), np.ndim(x) == 4)
