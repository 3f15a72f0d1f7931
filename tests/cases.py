"""The one case table: every configuration the operation tests run, on every device.

A ``Case`` is one call: op, shapes, geometry, dtypes, layout, biases, activations. Its ``tags``
say why it is in the table (which earlier sweep it stands for: "geometry", "dtypes",
"channels", "activations", "medium", "parallel", "torch", "specialised", "generic", ...);
``sim`` marks the cases small enough to run under the CUDA simulator. The table drives
tests/test_ops.py (device='cpu' and 'cuda' against the float64 reference), the PyTorch oracle
(tests/test_torch_oracle.py, tag "torch") and the benchmarks' own float64 reference
(tests/test_bench_reference.py checks numba_dsconv.bench.reference on every case).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from helpers import randn, x_shape


@dataclass(frozen=True)
class Case:
    op: str
    n: int = 2
    h: int = 5
    w: int = 5
    c: int = 3
    kh: int = 3
    kw: int = 3
    mult: int = 1
    c_out: int = 4
    stride: Any = 1
    padding: Any = "valid"
    dilation: Any = 1
    xdtype: type = np.float32
    wdtype: type | None = None  # None: the dtype of x
    layout: str = "NHWC"
    batched: bool = True
    biases: bool | str = False  # True: every bias of the op; "dw_bias" or "bias": that one
    activation: str | None = None
    mid_activation: str | None = None  # separable only
    scale: float = 1.0  # of x: 3 makes relu6 clip on both sides
    dw_4d: bool = False  # a (K_h, K_w, C, 1) depthwise kernel where M == 1
    tags: frozenset[str] = field(default_factory=frozenset)
    sim: bool = False

    def __post_init__(self) -> None:
        if self.op in ("conv2d", "pointwise") and self.mult != 1:
            raise ValueError(f"{self.op} has no depth multiplier: {self}")
        if self.op == "pointwise" and (self.kh, self.kw) != (1, 1):
            object.__setattr__(self, "kh", 1)
            object.__setattr__(self, "kw", 1)

    @property
    def id(self) -> str:
        geo = "" if self.op == "pointwise" else f" k{self.kh}x{self.kw} s{self.stride}"
        geo += "" if self.op == "pointwise" else f" p{self.padding} d{self.dilation}"
        wdt = "" if self.wdtype in (None, self.xdtype) else f"x{np.dtype(self.wdtype).name}"
        acts = f" {self.mid_activation}/{self.activation}" if self.op == "separable" else ""
        acts = acts or (f" {self.activation}" if self.activation else "")
        return (
            f"{self.op} {self.n}x{self.h}x{self.w}x{self.c} m{self.mult}->{self.c_out}{geo} "
            f"{np.dtype(self.xdtype).name}{wdt} {self.layout}{'' if self.batched else ' unb'}"
            f"{'' if not self.biases else ' biases' if self.biases is True else ' ' + self.biases}"
            f"{acts}{'' if self.scale == 1 else f' x{self.scale:g}'}"
        )

    @property
    def reduction_len(self) -> int:
        return {
            "conv2d": self.kh * self.kw * self.c,
            "depthwise": self.kh * self.kw,
            "pointwise": self.c,
            "separable": self.kh * self.kw * self.c * self.mult,
        }[self.op]

    @property
    def result_dtype(self) -> np.dtype:
        return np.result_type(self.xdtype, self.wdtype or self.xdtype)

    def geometry(self) -> dict[str, Any]:
        if self.op == "pointwise":
            return {}
        return {"stride": self.stride, "padding": self.padding, "dilation": self.dilation}

    def make(self, rng: np.random.Generator) -> tuple[np.ndarray, tuple, dict[str, Any]]:
        """(x, weights, keyword arguments) of the call: geometry, layout, biases, activations.

        dw is (K_h, K_w, C) when M == 1 (unless ``dw_4d``), else (K_h, K_w, C, M); pw is
        (C*M, C_out). Biases have the weights' dtype.
        """
        wdt = self.wdtype or self.xdtype
        shape = x_shape(self.n, self.h, self.w, self.c, self.layout, self.batched)
        x = randn(rng, shape, self.xdtype, self.scale)
        cm = self.c * self.mult
        dw_shape = (self.kh, self.kw, self.c)
        if self.mult != 1 or self.dw_4d:
            dw_shape = (*dw_shape, self.mult)
        kw: dict[str, Any] = dict(self.geometry(), layout=self.layout)
        if self.op == "conv2d":
            weights = (randn(rng, (self.kh, self.kw, self.c, self.c_out), wdt),)
        elif self.op == "depthwise":
            weights = (randn(rng, dw_shape, wdt),)
        elif self.op == "pointwise":
            weights = (randn(rng, (self.c, self.c_out), wdt),)
        else:
            weights = (randn(rng, dw_shape, wdt), randn(rng, (cm, self.c_out), wdt))
        if self.biases:
            if self.op == "separable" and self.biases in (True, "dw_bias"):
                kw["dw_bias"] = randn(rng, (cm,), wdt)
            if self.biases in (True, "bias"):
                kw["bias"] = randn(rng, (cm if self.op == "depthwise" else self.c_out,), wdt)
        if self.activation is not None:
            kw["activation"] = self.activation
        if self.mid_activation is not None:
            kw["mid_activation"] = self.mid_activation
        return x, weights, kw


def _tag(tag: str, cases, sim: bool = False) -> list[Case]:
    return [replace(c, tags=c.tags | {tag}, sim=c.sim or sim) for c in cases]


# The tables below are rows: the formatter leaves them as written.
# fmt: off

# --- geometry: every padding form, stride, dilation, kernel size, tiny and odd shapes --------
# (h, w, kh, kw, stride, padding, dilation)
_GEOMS = [
    (5, 5, 3, 3, 1, "valid", 1), (7, 9, 3, 3, 1, "same", 1), (7, 9, 3, 3, 2, "same", 1),
    (8, 8, 3, 3, 2, "same", 1), (8, 8, 2, 2, 1, "same", 1), (8, 7, 4, 4, 1, "same", 1),
    (9, 8, 4, 4, 2, "same", 1), (7, 7, 2, 2, 2, "same", 1), (10, 11, 3, 3, 3, "valid", 1),
    (9, 9, 3, 3, 3, "same", 1), (7, 9, 3, 3, (1, 2), "valid", 1), (7, 9, 3, 3, (1, 2), "same", 1),
    (6, 6, 3, 3, 1, 1, 1), (6, 7, 3, 5, 1, (1, 2), 1), (6, 7, 3, 3, 1, ((0, 2), (1, 0)), 1),
    (6, 7, 3, 3, 2, ((0, 2), (1, 0)), 1), (9, 9, 3, 3, 1, "valid", 2), (9, 9, 3, 3, 1, "same", 2),
    (9, 10, 3, 3, 2, "same", 2), (9, 9, 3, 3, 1, "valid", (2, 1)), (9, 9, 3, 2, 1, "same", (2, 1)),
    (4, 4, 1, 1, 1, "valid", 1), (5, 6, 1, 1, 2, "valid", 1), (6, 6, 2, 2, 1, "valid", 1),
    (7, 7, 5, 5, 1, "same", 1), (7, 8, 6, 6, 1, "same", 1), (8, 8, 7, 7, 1, "same", 1),
    (7, 7, 7, 7, 1, "valid", 1), (7, 9, 1, 3, 1, "same", 1), (7, 9, 3, 1, 2, "same", 1),
    (8, 9, 2, 5, (2, 1), 2, (1, 2)),
    (3, 3, 3, 3, 1, "valid", 1),  # 1x1 output
    (1, 1, 1, 1, 1, "valid", 1),
    (1, 1, 3, 3, 1, "same", 1),  # every tap but the centre reads padding
    (1, 9, 1, 3, 1, "same", 1),
    (5, 5, 3, 3, 1, 4, 1),  # padding wider than the kernel: all-zero border outputs
    (4, 5, 3, 3, 2, ((3, 0), (0, 3)), 1),
    (5, 5, 3, 3, 7, "same", 1),  # stride larger than the kernel
]
_OP_MULTS = [("conv2d", 1), ("depthwise", 1), ("depthwise", 2), ("separable", 1), ("separable", 2)]
GEOMETRY = _tag("geometry", [
    Case(op, n=2, h=h, w=w, c=3, kh=kh, kw=kw, mult=m, c_out=4, stride=s, padding=p, dilation=d)
    for op, m in _OP_MULTS for h, w, kh, kw, s, p, d in _GEOMS
])

# --- dtypes x layouts x batchedness, with biases (mixed dtypes give float64) -------------------
_DTYPES = [(np.float32, np.float32), (np.float64, np.float64), (np.float32, np.float64),
           (np.float64, np.float32)]
_MULT2 = {"conv2d": 1, "pointwise": 1, "depthwise": 2, "separable": 2}
DTYPES = _tag("dtypes", [
    Case(op, n=2, h=7, w=6, c=3, kh=3, kw=2, mult=_MULT2[op], c_out=5, xdtype=xdt, wdtype=wdt,
         layout=layout, batched=batched, biases=True, stride=(2, 1), padding="same")
    for op in _MULT2 for xdt, wdt in _DTYPES for layout in ("NHWC", "NCHW")
    for batched in (True, False)
])

# --- channel counts: vector widths and their remainders -------------------------------------
CHANNELS = _tag("channels", [
    Case(op, n=1, h=6, w=5, c=c, mult=m if _MULT2[op] == 2 else 1, c_out=co, biases=True,
         padding="same")
    for op in _MULT2
    for c, m, co in [(1, 1, 1), (1, 3, 2), (5, 1, 7), (8, 2, 16), (17, 1, 33), (32, 1, 8)]
])

# --- biases and activations (scale 3: relu6 clips on both sides; tag "clips" checks it) ------
_ACTS = [None, "relu", "relu6"]
ACTIVATIONS = _tag("activations", [
    Case(op, n=2, h=6, w=6, c=4, c_out=4, scale=3.0, biases=b, activation=a, padding="same",
         tags=frozenset({"clips"}))
    for op in ("conv2d", "depthwise", "pointwise") for a in _ACTS for b in (False, True)
] + [
    Case("separable", n=2, h=6, w=6, c=4, mult=2, c_out=5, scale=3.0, biases=b, padding="same",
         mid_activation=mid, activation=a)
    for mid in _ACTS for a in _ACTS for b in (False, "dw_bias", "bias", True)
])

# --- medium sizes: many channels (fused tiles of several pixel counts), long reductions ------
# (op, n, h, w, c, kh, kw, stride, padding, dilation, mult, c_out)
_MEDIUM = [
    ("separable", 1, 13, 11, 96, 3, 3, 2, ((0, 2), (1, 0)), 1, 2, 40),
    ("separable", 3, 10, 9, 40, 5, 5, 1, "same", 1, 1, 72),
    ("separable", 1, 17, 19, 24, 3, 3, (1, 2), "same", (2, 1), 3, 33),
    ("depthwise", 2, 15, 14, 70, 3, 3, 2, "same", 1, 2, 0),
    # 3x3, multiplier 1: the vector interior path, with a channel tail, dilated/strided
    ("depthwise", 2, 11, 13, 35, 3, 3, (2, 1), "same", (1, 2), 1, 0),
    ("separable", 1, 9, 12, 48, 3, 3, (1, 2), ((2, 0), (1, 1)), (2, 1), 1, 24),
    # stride == dilation, odd interior widths
    ("depthwise", 2, 9, 12, 37, 3, 3, 1, "same", 1, 1, 0),
    ("separable", 1, 13, 15, 33, 3, 3, 2, "same", 2, 1, 20),
    ("conv2d", 1, 9, 9, 64, 7, 7, 1, "same", 1, 1, 64),  # reduction 3136
    ("conv2d", 2, 12, 11, 20, 3, 3, 2, "same", 1, 1, 36),
    # conv2d's direct path (AVX-512): tiles across images, a non-square dilated kernel with
    # uneven padding, two pairs, 1x1 strided; C_out 24 (a cut panel alone on the tap block),
    # 96 (a pair and an odd panel)
    ("conv2d", 2, 9, 10, 7, 3, 3, 1, 1, 1, 1, 24),
    ("conv2d", 1, 11, 9, 6, 3, 3, 2, "same", 1, 1, 96),
    ("conv2d", 2, 9, 10, 5, 3, 3, 1, 1, 1, 1, 64),
    ("conv2d", 1, 13, 12, 12, 2, 5, (2, 1), ((0, 2), (1, 0)), (1, 2), 1, 128),
    ("conv2d", 3, 6, 7, 9, 1, 1, 2, "valid", 1, 1, 64),
    ("conv2d", 1, 14, 14, 64, 3, 3, 1, "same", 1, 1, 320),  # 5 pairs: split in odd panels once
    ("pointwise", 3, 9, 10, 130, 1, 1, 1, "valid", 1, 1, 67),
]


def _from_tuple(t, **kw) -> Case:
    op, n, h, w, c, kh, kw_, s, p, d, m, co = t
    return Case(op, n=n, h=h, w=w, c=c, kh=kh, kw=kw_, stride=s, padding=p, dilation=d,
                mult=m, c_out=co or c * m, **kw)


MEDIUM = _tag("medium", [
    _from_tuple(t, xdtype=dt, biases=True, activation=act,
                mid_activation="relu" if act and t[0] == "separable" else None)
    for t in _MEDIUM for dt in (np.float32, np.float64) for act in (None, "relu6")
])

# --- the parallel kernels on small inputs (test_ops runs these with SERIAL_MAX_MACS = 0) ------
# (n, h, w, c, kh, kw, stride, padding, dilation, mult, c_out)
_PARALLEL = [
    (2, 7, 9, 3, 3, 3, 1, "same", 1, 2, 5),
    (1, 9, 8, 4, 4, 4, 2, "same", 1, 1, 3),
    (1, 8, 9, 3, 2, 5, (2, 1), ((0, 2), (1, 0)), (1, 2), 2, 4),
    (3, 6, 6, 8, 3, 3, 1, "valid", 2, 1, 16),
    (0, 6, 6, 3, 3, 3, 1, "valid", 1, 1, 2),
]
PARALLEL = _tag("parallel", [
    _from_tuple((op, *t[:9], t[9] if _MULT2[op] == 2 else 1, t[10]), xdtype=dt, biases=True,
                activation="relu", mid_activation="relu6" if op == "separable" else None)
    for t in _PARALLEL for op in _MULT2 for dt in (np.float32, np.float64)
])

# --- MobileNet-like layers and odd ones, compared with torch too --------------------------------
_TORCH = [
    ("conv2d", 1, 32, 32, 3, 3, 3, 2, "same", 1, 1, 32),  # stem
    ("separable", 1, 16, 16, 32, 3, 3, 1, "same", 1, 1, 64),
    ("separable", 1, 16, 16, 64, 3, 3, 2, "same", 1, 1, 128),
    ("separable", 2, 8, 8, 128, 3, 3, 1, "same", 1, 1, 128),
    ("separable", 1, 7, 7, 256, 3, 3, 2, "same", 1, 1, 512),
    ("separable", 1, 4, 4, 512, 3, 3, 1, "same", 1, 1, 512),
    ("depthwise", 1, 15, 15, 32, 3, 3, 2, "same", 1, 1, 0),
    ("pointwise", 1, 7, 7, 256, 1, 1, 1, "valid", 1, 1, 256),
    ("pointwise", 1, 14, 14, 16, 1, 1, 1, "valid", 1, 1, 96),  # V2 expansion
    ("depthwise", 1, 14, 14, 96, 3, 3, 2, "same", 1, 1, 0),
    ("pointwise", 1, 7, 7, 96, 1, 1, 1, "valid", 1, 1, 24),  # V2 projection
    ("separable", 1, 11, 13, 24, 5, 5, 2, "same", 1, 1, 40),
    ("depthwise", 2, 9, 9, 16, 7, 7, 1, "same", 1, 2, 0),
    ("separable", 1, 12, 10, 8, 3, 3, 1, "same", 2, 3, 16),
    ("conv2d", 2, 9, 11, 5, 4, 2, (2, 1), ((0, 2), (1, 0)), (1, 2), 1, 7),
    ("separable", 1, 9, 11, 6, 2, 4, (1, 2), (1, 2), (2, 1), 2, 9),
    ("conv2d", 1, 10, 10, 16, 1, 1, 2, "valid", 1, 1, 24),
]
TORCH = _tag("torch", [
    _from_tuple(t, xdtype=dt, biases=True, activation="relu",
                mid_activation="relu6" if t[0] == "separable" else None,
                dw_4d=t[0] == "separable" and t[10] == 1)
    for t in _TORCH for dt in (np.float32, np.float64)
])

# --- every specialised CUDA build (K x K, stride s) and the generic one -------------------------
_DW_SEP_CONV = ("depthwise", "separable", "conv2d")
SPECIALISED = _tag("specialised", [
    Case(op, n=1, h=k + 2, w=k + 3, c=3, kh=k, kw=k, c_out=5, biases=True, stride=s,
         padding="same", activation="relu6")
    for op in _DW_SEP_CONV for k in (3, 5, 7) for s in (1, 2)
], sim=True)
GENERIC = _tag("generic", [
    Case(op, n=2, h=6, w=7, c=3, kh=kh, kw=kw, c_out=5, biases=True, stride=s, padding=p,
         dilation=d)
    for op in _DW_SEP_CONV
    for kh, kw, s, p, d in [(2, 4, (1, 2), ((0, 2), (1, 0)), 1), (3, 3, 3, 1, (2, 1)),
                            (1, 1, 1, "valid", 1), (4, 4, 2, "same", 1)]
], sim=True)
# specialised 3x3 builds with dilation: the CUDA register window serves column dilation 1
DILATED = _tag("dilated", [
    Case("depthwise", n=2, h=9, w=11, c=3, mult=2, biases=True, stride=s, padding=2, dilation=d)
    for s in (1, 2) for d in ((2, 1), (1, 2), 2)
], sim=True)
# the small configurations the CUDA backend was first checked on: both dtypes with activations,
# multiplier 2, every layout and batchedness, an empty batch, mixed dtypes
SMALL = _tag("small", [
    Case(op, n=2, h=5, w=6, c=3, c_out=5, xdtype=dt, biases=True, activation="relu",
         padding="same", mid_activation="relu" if op == "separable" else None)
    for op in _MULT2 for dt in (np.float32, np.float64)
] + [
    Case(op, n=1, h=5, w=5, c=3, mult=2, c_out=4, biases=True, padding=1, stride=2)
    for op in ("depthwise", "separable")
] + [
    Case(op, n=2, h=5, w=4, c=3, c_out=4, layout=layout, batched=b, padding=1)
    for op in _MULT2 for layout in ("NHWC", "NCHW") for b in (True, False)
] + [
    Case("separable", n=0, padding=1),
    Case("separable", xdtype=np.float32, wdtype=np.float64, padding=1),
], sim=True)

# fmt: on

CASES: list[Case] = (
    GEOMETRY + DTYPES + CHANNELS + ACTIVATIONS + MEDIUM + PARALLEL + TORCH + SPECIALISED
    + GENERIC + DILATED + SMALL
)  # fmt: skip


def select(*tags: str, cases: list[Case] | None = None) -> list[Case]:
    """The cases with any of ``tags``."""
    return [c for c in (CASES if cases is None else cases) if c.tags & set(tags)]


def params(cases: list[Case]) -> list[Any]:
    """pytest parameters (with readable ids) for ``cases``."""
    import pytest

    return [pytest.param(c, id=f"{'+'.join(sorted(c.tags))}: {c.id}") for c in cases]


__all__ = ["CASES", "Case", "make_case", "params", "select"]


def make_case(rng: np.random.Generator, op: str, **fields: Any):
    """(x, weights, biases as keywords, reduction length) of ``Case(op, **fields)``, for tests
    that pass the geometry and activations themselves."""
    case = Case(op, **fields)
    x, weights, kwargs = case.make(rng)
    biases = {k: kwargs[k] for k in ("dw_bias", "bias") if k in kwargs}
    return x, weights, biases, case.reduction_len
