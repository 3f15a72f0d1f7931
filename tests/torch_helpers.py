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


def torch_forward(op, x, weights, biases, kwargs):
    """The op on torch tensors (autograd records it), spelled with torch.nn.functional
    (NCHW inside), from arguments in numba_dsconv's conventions (x in ``kwargs["layout"]``,
    weights as numba_dsconv takes them, biases by name)."""
    layout = kwargs["layout"]
    xt = x if layout == "NCHW" else x.permute(*((0, 3, 1, 2) if x.dim() == 4 else (2, 0, 1)))
    batched = xt.dim() == 4
    if not batched:
        xt = xt[None]
    acts = {None: lambda t: t, "relu": F.relu, "relu6": F.relu6}

    def spatial(t, w_torch, groups, b):
        hw = t.shape[2:]
        (top, bottom), (left, right) = normalize_padding(
            kwargs["padding"], hw, w_torch.shape[2:], kwargs["stride"], kwargs["dilation"]
        )
        t = F.pad(t, (left, right, top, bottom))
        return F.conv2d(t, w_torch, b, stride=kwargs["stride"], dilation=kwargs["dilation"],
                        groups=groups)  # fmt: skip

    def depthwise_weight(dw):
        d4 = dw if dw.dim() == 4 else dw[..., None]
        kh, kw, c, m = d4.shape
        return d4.permute(2, 3, 0, 1).reshape(c * m, 1, kh, kw), c

    if op == "conv2d":
        y = spatial(xt, weights[0].permute(3, 2, 0, 1), 1, biases.get("bias"))
    elif op == "depthwise":
        wt, c = depthwise_weight(weights[0])
        y = spatial(xt, wt, c, biases.get("bias"))
    elif op == "pointwise":
        y = F.conv2d(xt, weights[0].T[:, :, None, None], biases.get("bias"))
    else:
        wt, c = depthwise_weight(weights[0])
        mid = acts[kwargs["mid_activation"]](spatial(xt, wt, c, biases.get("dw_bias")))
        y = F.conv2d(mid, weights[1].T[:, :, None, None], biases.get("bias"))
    y = acts[kwargs["activation"]](y)
    if layout == "NHWC":
        y = y.permute(0, 2, 3, 1)
    return y if batched else y[0]
