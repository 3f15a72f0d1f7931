"""The normalised geometry of one call, computed once.

Every public function turns its arguments into a :class:`ConvSpec` here; backends read the spec
and never re-validate. All shapes in the spec are NHWC and batched (the internal layout).
"""

from __future__ import annotations

import enum
import functools
import numbers
from dataclasses import dataclass
from typing import Any

LAYOUTS = ("NHWC", "NCHW")


class Activation(enum.IntEnum):
    """The fused activations. Kernels receive ``int(member)``; NaN passes through each."""

    NONE = 0
    RELU = 1  # v < 0 -> 0
    RELU6 = 2  # v < 0 -> 0, v > 6 -> 6

    @classmethod
    def parse(cls, value: object, name: str) -> Activation:
        """None | 'relu' | 'relu6' -> member; anything else raises, naming ``name``."""
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{name} must be None, 'relu' or 'relu6'; got {value!r}")
        member = _ACTIVATION_NAMES.get(value)
        if member is None:
            raise ValueError(f"{name} must be None, 'relu' or 'relu6'; got {value!r}")
        return member


_ACTIVATION_NAMES = {None: Activation.NONE, "relu": Activation.RELU, "relu6": Activation.RELU6}


# The integer geometry every kernel takes as one argument (CPU and CUDA alike), in this order.
# A plain tuple: Numba's dispatcher types it on its fast path (a NamedTuple argument is
# slower to dispatch, and two NamedTuple classes of the same shape share a type code).
GEOMETRY_FIELDS = (
    "kh",
    "kw",
    "stride_h",
    "stride_w",
    "dilation_h",
    "dilation_w",
    "pad_top",
    "pad_left",
    "multiplier",
)
Geometry = tuple[int, int, int, int, int, int, int, int, int]


@dataclass(frozen=True)
class ConvSpec:
    """Normalised geometry of one convolution call (internal layout: NHWC, batched).

    ``op`` is one of ``"conv2d"``, ``"depthwise"``, ``"pointwise"``, ``"separable"``.
    For conv2d ``c_mid`` equals ``c_in`` and ``multiplier`` is 1; for depthwise ``c_out`` equals
    ``c_mid = c_in * multiplier``.
    """

    op: str
    layout: str
    batched: bool
    n: int
    h: int
    w: int
    c_in: int
    kh: int
    kw: int
    multiplier: int
    c_mid: int
    c_out: int
    stride_h: int
    stride_w: int
    dilation_h: int
    dilation_w: int
    pad_top: int
    pad_bottom: int
    pad_left: int
    pad_right: int
    out_h: int
    out_w: int
    activation: Activation = Activation.NONE
    mid_activation: Activation = Activation.NONE

    @functools.cached_property
    def geometry(self) -> Geometry:
        """The kernels' geometry argument, GEOMETRY_FIELDS in order (computed once per spec)."""
        return (
            self.kh,
            self.kw,
            self.stride_h,
            self.stride_w,
            self.dilation_h,
            self.dilation_w,
            self.pad_top,
            self.pad_left,
            self.multiplier,
        )

    @property
    def pixels(self) -> int:
        """Output pixels over the batch (the rows of the pointwise GEMM)."""
        return self.n * self.out_h * self.out_w

    @property
    def out_nhwc(self) -> tuple[int, int, int, int]:
        return (self.n, self.out_h, self.out_w, self.c_out)

    @property
    def mid_nhwc(self) -> tuple[int, int, int, int]:
        return (self.n, self.out_h, self.out_w, self.c_mid)

    @property
    def output_shape(self) -> tuple[int, ...]:
        """The result shape in the caller's layout and batchedness."""
        if self.layout == "NHWC":
            shape: tuple[int, ...] = (self.n, self.out_h, self.out_w, self.c_out)
        else:
            shape = (self.n, self.c_out, self.out_h, self.out_w)
        return shape if self.batched else shape[1:]

    @property
    def macs(self) -> int:
        """Multiply-adds this call performs (the work that decides serial vs parallel)."""
        pix = self.n * self.out_h * self.out_w
        taps = self.kh * self.kw
        if self.op == "conv2d":
            return pix * taps * self.c_in * self.c_out
        if self.op == "depthwise":
            return pix * taps * self.c_mid
        if self.op == "pointwise":
            return pix * self.c_in * self.c_out
        return pix * (taps * self.c_mid + self.c_mid * self.c_out)


# --------------------------------------------------------------------------------------------
# argument normalisation (each helper names the argument it checks)


def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def pair(value: object, name: str, *, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints, each >= minimum, as (h, w)."""
    if _is_int(value):
        vals = (int(value), int(value))  # type: ignore[call-overload]
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_int(v) for v in value):
        vals = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{name} must be an int or a pair of ints (h, w); got {value!r}")
    if min(vals) < minimum:
        raise ValueError(f"{name} must be >= {minimum} in each dimension; got {value!r}")
    return vals


def check_layout(layout: object) -> str:
    if not isinstance(layout, str):
        raise TypeError(f"layout must be 'NHWC' or 'NCHW'; got {layout!r}")
    up = layout.upper()
    if up not in LAYOUTS:
        raise ValueError(f"layout must be 'NHWC' or 'NCHW'; got {layout!r}")
    return up


def _same_1d(size: int, k: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow's 'same': out = ceil(in/stride), the odd extra row/column after."""
    out = -(-size // stride)
    total = max(0, (out - 1) * stride + (k - 1) * dilation + 1 - size)
    return total // 2, total - total // 2


def padding_amounts(
    padding: object,
    hw: tuple[int, int],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) for any accepted padding form."""
    if isinstance(padding, str):
        mode = padding.lower()
        if mode == "valid":
            return (0, 0, 0, 0)
        if mode == "same":
            t, b = _same_1d(hw[0], kernel[0], stride[0], dilation[0])
            left, r = _same_1d(hw[1], kernel[1], stride[1], dilation[1])
            return (t, b, left, r)
        raise ValueError(
            f"padding must be 'valid', 'same', an int, (ph, pw) or ((top, bottom), (left, right)); "
            f"got the string {padding!r}"
        )
    expected = "'valid', 'same', an int, (ph, pw) or ((top, bottom), (left, right))"
    if _is_int(padding):
        p = int(padding)  # type: ignore[call-overload]
        vals = (p, p, p, p)
    elif isinstance(padding, (tuple, list)) and len(padding) == 2:
        a, b = padding
        if _is_int(a) and _is_int(b):
            vals = (int(a), int(a), int(b), int(b))
        elif (
            isinstance(a, (tuple, list))
            and isinstance(b, (tuple, list))
            and len(a) == 2
            and len(b) == 2
            and all(_is_int(v) for v in (*a, *b))
        ):
            vals = (int(a[0]), int(a[1]), int(b[0]), int(b[1]))
        else:
            raise TypeError(f"padding must be {expected}; got {padding!r}")
    else:
        raise TypeError(f"padding must be {expected}; got {padding!r}")
    if min(vals) < 0:
        raise ValueError(f"padding must be >= 0 everywhere; got {padding!r}")
    return vals  # type: ignore[return-value]


# Every index the kernels form (CPU and CUDA) is a signed 64-bit integer: byte offsets into x,
# the intermediate and out, and the input coordinates of the taps (in the padding too, before
# any bounds check). _check_index_range keeps a bound on all of them below this: half of
# int64's range, so a sum of two such terms cannot wrap either.
INDEX_LIMIT = 2**62
_LARGEST_ITEMSIZE = 8


def _check_index_range(
    x_name: str,
    x_shape: tuple[int, ...],
    n: int,
    extents: tuple[int, int],
    channels: int,
    kernel: tuple[int, int],
    given: dict[str, object],
    values_of: dict[str, tuple[int, ...]],
    terms: dict[str, tuple[int, int]],
) -> None:
    """Raise ValueError, naming the argument that dominates, where an index could overflow.

    ``extents`` are the larger of the input's and the output's rows and columns, ``channels``
    the widest of input, intermediate and output. A tap's row (column) coordinate stays within
    the input extent plus the sums of ``terms`` (the stride, the total padding, the dilated
    kernel span), and the kernels multiply a coordinate by one row (column) stride only, so
    every byte offset is below (N + 1) images + that many rows + that many columns, of 8-byte
    elements.
    """
    # each value is a 64-bit kernel argument itself (even a dilation no tap multiplies)
    huge = [f"{k}={given[k]!r}" for k, v in values_of.items() if max(v) >= INDEX_LIMIT]
    if huge:
        raise ValueError(
            f"{' and '.join(huge)} {'is' if len(huge) == 1 else 'are'} too large: the kernels "
            f"take each value as a signed 64-bit integer, below 2**{INDEX_LIMIT.bit_length() - 1}"
        )
    rows = extents[0] + sum(t[0] for t in terms.values())
    cols = extents[1] + sum(t[1] for t in terms.values())
    image = extents[0] * extents[1]
    bound = ((n + 1) * image + rows * extents[1] + cols) * channels * _LARGEST_ITEMSIZE
    if bound < INDEX_LIMIT:
        return
    name, largest = max(((k, max(v)) for k, v in terms.items()), key=lambda kv: kv[1])
    if largest < max(extents):
        culprit = f"{x_name} of shape {tuple(x_shape)} with {channels} channels"
    elif name == "dilation" and max(values_of["dilation"]) == 1:
        culprit = f"the {kernel[0]}x{kernel[1]} kernel"
    else:
        culprit = f"{name}={given[name]!r}"
    raise ValueError(
        f"{culprit} is too large: the kernels' index arithmetic (signed 64-bit) would reach "
        f"about 2**{bound.bit_length() - 1} bytes for {x_name} of shape {tuple(x_shape)}; "
        f"every offset must stay below 2**{INDEX_LIMIT.bit_length() - 1}"
    )


def _out_size(size: int, before: int, after: int, k: int, stride: int, dilation: int) -> int:
    span = (k - 1) * dilation + 1
    padded = size + before + after
    if padded < span:
        return 0
    return (padded - span) // stride + 1


_SPEC_CACHE: dict[tuple, ConvSpec] = {}
_SPEC_CACHE_MAX = 1024


_LEAVES = (int, str, Activation)


def plain_value(v: object) -> bool:
    """A value whose equality implies the same validation outcome: exact ints and strings
    (and Activation members), and tuples (of tuples) of them. Bools, floats, NumPy integers
    and lists take the uncached path: True == 1.0 == 1, but only 1 is a valid stride. A flat
    loop, not a recursive generator: this runs on every call."""
    t = type(v)
    if t is not tuple:
        return t in _LEAVES
    for e in v:  # type: ignore[attr-defined]
        te = type(e)
        if te is tuple:
            for f in e:
                if type(f) is not int:
                    return False
        elif te is not int and te is not str:
            return False
    return True


def make_spec(op: str, **kwargs: Any) -> ConvSpec:
    """Validate the geometry against x's shape and build the spec (see ``_build_spec``).

    Specs are immutable, so the spec of an argument set seen before is returned from a small
    memo (validation and padding arithmetic are a visible part of a small call's time).
    """
    for v in kwargs.values():
        if not plain_value(v):
            return _build_spec(op, **kwargs)
    key = (op, *kwargs.items())
    spec = _SPEC_CACHE.get(key)
    if spec is None:
        spec = _build_spec(op, **kwargs)
        if len(_SPEC_CACHE) < _SPEC_CACHE_MAX:
            _SPEC_CACHE[key] = spec
    return spec


def _build_spec(
    op: str,
    *,
    x_shape: tuple[int, ...],
    layout: str,
    kernel: tuple[int, int],
    c_in_kernel: int,
    multiplier: int,
    c_out: int,
    stride: object = 1,
    padding: object = "valid",
    dilation: object = 1,
    activation: Activation = Activation.NONE,
    mid_activation: Activation = Activation.NONE,
    kernel_name: str = "w",
    x_name: str = "x",
    for_kernels: bool = True,
) -> ConvSpec:
    """Validate the geometry against x's shape and build the spec.

    ``x_shape`` is the caller's shape (3-D or 4-D, in ``layout``); ``c_in_kernel`` is the
    input-channel count the weights expect (named ``kernel_name`` in errors). Unless
    ``for_kernels`` is False (the cost model: exact integers, nothing is run), the geometry
    must keep every index the kernels form within 64 bits (``_check_index_range``).
    """
    if len(x_shape) not in (3, 4):
        raise ValueError(
            f"{x_name} must be 4-D (N,{','.join(layout[1:])}) or 3-D ({','.join(layout[1:])}) "
            f"for layout={layout!r}; got shape {tuple(x_shape)}"
        )
    batched = len(x_shape) == 4
    shape4 = tuple(x_shape) if batched else (1, *x_shape)
    if layout == "NHWC":
        n, h, w, c = shape4
    else:
        n, c, h, w = shape4
    if c != c_in_kernel:
        raise ValueError(
            f"{x_name} has {c} channels ({layout} shape {tuple(x_shape)}) but {kernel_name} "
            f"expects {c_in_kernel} input channels"
        )
    if h == 0 or w == 0 or c == 0:
        raise ValueError(
            f"{x_name} must have non-zero height, width and channels; got shape {tuple(x_shape)}"
        )
    s = pair(stride, "stride", minimum=1)
    d = pair(dilation, "dilation", minimum=1)
    t, b, left, r = padding_amounts(padding, (h, w), kernel, s, d)
    oh = _out_size(h, t, b, kernel[0], s[0], d[0])
    ow = _out_size(w, left, r, kernel[1], s[1], d[1])
    if oh <= 0 or ow <= 0:
        raise ValueError(
            f"the output would be empty: {kernel_name} kernel {kernel[0]}x{kernel[1]} with "
            f"dilation {d} does not fit the padded input {h + t + b}x{w + left + r} "
            f"({x_name} spatial size {h}x{w}, padding {(t, b, left, r)})"
        )
    if for_kernels:
        # the bound of _check_index_range, computed inline: its messages are built on failure
        span_h, span_w = (kernel[0] - 1) * d[0] + 1, (kernel[1] - 1) * d[1] + 1
        eh, ew = max(h, oh), max(w, ow)
        rows, cols = eh + s[0] + t + b + span_h, ew + s[1] + left + r + span_w
        chans = max(c, c * multiplier, c_out)
        bound = ((n + 1) * eh * ew + rows * ew + cols) * chans * _LARGEST_ITEMSIZE
        if bound >= INDEX_LIMIT or max(*s, *d, t, b, left, r) >= INDEX_LIMIT:
            _check_index_range(
                x_name,
                x_shape,
                n,
                (eh, ew),
                chans,
                kernel,
                {"stride": stride, "padding": padding, "dilation": dilation},
                {"stride": s, "padding": (t, b, left, r), "dilation": d},
                {"stride": s, "padding": (t + b, left + r), "dilation": (span_h, span_w)},
            )
    # the fields in ConvSpec's order
    return ConvSpec(op, layout, batched, n, h, w, c, *kernel, multiplier, c * multiplier, c_out,
                    *s, *d, t, b, left, r, oh, ow, activation, mid_activation)  # fmt: skip
