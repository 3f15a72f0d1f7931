"""The section 3.3 cost model of MobileNets: standard vs depthwise separable convolution."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from ._spec import _is_int, make_spec, pair

__all__ = ["Cost", "cost"]


@dataclass(frozen=True)
class Cost:
    """Exact multiply-add (MAC) and weight counts for one layer geometry.

    ``mac_ratio`` and ``param_ratio`` are separable / standard. For stride 1 and 'same' padding
    ``mac_ratio`` equals the paper's ``1/C_out + 1/K^2`` (per unit of depth multiplier).
    """

    output_shape: tuple[int, ...]
    standard_macs: int
    depthwise_macs: int
    pointwise_macs: int
    separable_macs: int
    standard_params: int
    separable_params: int
    mac_ratio: float
    param_ratio: float


def cost(
    input_shape: tuple[int, ...],
    kernel_size: int | tuple[int, int],
    c_out: int,
    *,
    stride: int | tuple[int, int] = 1,
    padding: object = "valid",
    dilation: int | tuple[int, int] = 1,
    depth_multiplier: int = 1,
) -> Cost:
    """MACs and parameters of a standard K x K convolution and of its separable replacement.

    Parameters
    ----------
    input_shape : (H, W, C_in) or (N, H, W, C_in)
    kernel_size : int or (K_h, K_w)
    c_out : output channels
    stride, padding, dilation : as in :func:`numba_dsconv.separable`
    depth_multiplier : M, the depthwise stage produces C_in*M channels

    Returns
    -------
    Cost, with output_shape (H_out, W_out, C_out) (with N first if input_shape had it).
    Standard: N*H_out*W_out*K_h*K_w*C_in*C_out MACs, K_h*K_w*C_in*C_out weights.
    Separable: depthwise N*H_out*W_out*K_h*K_w*C_in*M + pointwise N*H_out*W_out*C_in*M*C_out
    MACs; K_h*K_w*C_in*M + C_in*M*C_out weights. Biases are not counted.

    Examples
    --------
    >>> from numba_dsconv import cost
    >>> c = cost((112, 112, 32), 3, 64, padding="same")
    >>> c.output_shape, c.standard_macs, c.separable_macs
    ((112, 112, 64), 231211008, 29302784)
    >>> round(c.mac_ratio, 4)  # 1/C_out + 1/K^2
    0.1267
    """
    if not isinstance(input_shape, (tuple, list)) or not all(_is_int(v) for v in input_shape):
        raise TypeError(f"input_shape must be a tuple of ints; got {input_shape!r}")
    if len(input_shape) not in (3, 4):
        raise ValueError(
            f"input_shape must be (H, W, C_in) or (N, H, W, C_in); got {input_shape!r}"
        )
    # every count is an exact Python int, whatever integer type was passed (NumPy's wrap)
    shape = tuple(int(v) for v in input_shape)
    if len(shape) == 4 and shape[0] < 0:
        raise ValueError(f"input_shape must have N >= 0; got {input_shape!r}")
    if min(shape[-3:]) < 1:
        raise ValueError(f"input_shape must have positive H, W, C_in; got {input_shape!r}")
    kh, kw = pair(kernel_size, "kernel_size", minimum=1)
    if not _is_int(c_out):
        raise TypeError(f"c_out must be an int; got {c_out!r}")
    if not _is_int(depth_multiplier):
        raise TypeError(f"depth_multiplier must be an int; got {depth_multiplier!r}")
    c_out, depth_multiplier = int(c_out), int(depth_multiplier)
    if c_out < 1:
        raise ValueError(f"c_out must be >= 1; got {c_out!r}")
    if depth_multiplier < 1:
        raise ValueError(f"depth_multiplier must be >= 1; got {depth_multiplier!r}")
    spec = make_spec(
        "separable",
        x_shape=shape,
        layout="NHWC",
        kernel=(kh, kw),
        c_in_kernel=shape[-1],
        multiplier=depth_multiplier,
        c_out=c_out,
        stride=stride,
        padding=padding,
        dilation=dilation,
        kernel_name="kernel_size",
        x_name="input_shape",
        for_kernels=False,
    )
    pix = spec.n * spec.out_h * spec.out_w
    taps = kh * kw
    c_in, cm = spec.c_in, spec.c_mid
    standard = pix * taps * c_in * c_out
    dw = pix * taps * cm
    pw = pix * cm * c_out
    std_params = taps * c_in * c_out
    sep_params = taps * cm + cm * c_out
    out_shape = (spec.out_h, spec.out_w, c_out)
    if len(shape) == 4:
        out_shape = (spec.n, *out_shape)
    return Cost(
        output_shape=out_shape,
        standard_macs=standard,
        depthwise_macs=dw,
        pointwise_macs=pw,
        separable_macs=dw + pw,
        standard_params=std_params,
        separable_params=sep_params,
        mac_ratio=float(Fraction(dw + pw, standard)) if standard else float("nan"),
        param_ratio=float(Fraction(sep_params, std_params)),
    )
