"""The work of one call: FLOPs, compulsory bytes, and the roofline floor they give.

Roofline: ``floor = max(FLOPs / compute ceiling, bytes / copy bandwidth)`` (the compute ceiling: the
FMA peak where measured, else the SGEMM rate; ``Ceilings.compute_gflops``) with 2 FLOPs per
multiply-add and bytes = every input (x, weights) read once + the output written once, in the result
dtype. The intermediate of a fused separable layer is not counted (not storing it is the point of
fusing). ``% of roofline = floor / measured time``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..cost import cost
from .suite import Layer

OPS: tuple[str, ...] = ("separable", "depthwise", "pointwise", "conv2d")


@dataclass(frozen=True)
class Work:
    """FLOPs and compulsory bytes of one call of ``op`` on a suite layer (float32)."""

    op: str
    batch: int
    flops: int
    nbytes: int
    x_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    @property
    def intensity(self) -> float:
        """Arithmetic intensity, FLOP per byte."""
        return self.flops / self.nbytes


def work(lay: Layer, op: str, batch: int, itemsize: int = 4) -> Work:
    """FLOPs (2 per multiply-add, from :func:`numba_dsconv.cost`) and bytes of one call.

    separable: x -> (N, H_out, W_out, C_out), the depthwise + pointwise MACs, the intermediate
    not counted; depthwise: x -> (N, H_out, W_out, C_in); pointwise: the pointwise stage of the
    layer, (N, H_out, W_out, C_in) -> (N, H_out, W_out, C_out); conv2d: the standard K x K
    convolution of the layer.

    Examples
    --------
    >>> from numba_dsconv.bench import suite, work
    >>> w = work(suite.layer(7), "separable", 1)
    >>> w.flops, w.nbytes
    (103663616, 4632576)
    """
    if op not in OPS:
        raise ValueError(f"op must be one of {', '.join(OPS)}; got {op!r}")
    c = cost(
        (batch, lay.hw, lay.hw, lay.c_in),
        lay.kernel,
        lay.c_out,
        stride=lay.stride,
        padding=lay.padding,
    )
    n, ho, wo, _ = c.output_shape
    x_shape = (batch, lay.hw, lay.hw, lay.c_in)
    mid_shape = (n, ho, wo, lay.c_in)
    out_shape = (n, ho, wo, lay.c_out)
    taps = lay.kernel * lay.kernel
    if op == "separable":
        macs = c.depthwise_macs + c.pointwise_macs
        elems = (x_shape, (taps * lay.c_in,), (lay.c_in * lay.c_out,), out_shape)
    elif op == "depthwise":
        macs = c.depthwise_macs
        elems = (x_shape, (taps * lay.c_in,), mid_shape)
        out_shape = mid_shape
    elif op == "pointwise":
        macs = c.pointwise_macs
        elems = (mid_shape, (lay.c_in * lay.c_out,), out_shape)
        x_shape = mid_shape
    else:
        macs = c.standard_macs
        elems = (x_shape, (taps * lay.c_in * lay.c_out,), out_shape)
    nbytes = itemsize * sum(math.prod(s) for s in elems)
    return Work(op, batch, 2 * macs, nbytes, x_shape, out_shape)


def roofline_floor(flops: float, nbytes: float, compute_gflops: float, copy_gbs: float) -> float:
    """Seconds a call cannot beat: max(FLOPs / compute ceiling, bytes / copy bandwidth); the
    compute ceiling is ``Ceilings.compute_gflops`` (the FMA peak where measured).

    A ceiling that is unknown (NaN) or not positive drops out of the max.

    Examples
    --------
    >>> roofline_floor(2e9, 1e9, 100.0, 10.0)  # 20 ms of FLOPs, 100 ms of bytes
    0.1
    """
    terms = [0.0]
    if math.isfinite(compute_gflops) and compute_gflops > 0:
        terms.append(flops / (compute_gflops * 1e9))
    if math.isfinite(copy_gbs) and copy_gbs > 0:
        terms.append(nbytes / (copy_gbs * 1e9))
    return max(terms)
