"""The MobileNet layer suite: one definition shared by asv, the command line and the tests.

Every layer is a 3x3 depthwise separable layer with padding 1: MobileNetV1's rows 1-7 and four
MobileNetV2 shapes (BENCHMARKS.md names them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Layer:
    number: int
    net: str
    hw: int
    c_in: int
    c_out: int
    stride: int
    kernel: int = 3
    padding: int = 1

    @property
    def name(self) -> str:
        return (
            f"{self.number}:{self.net} {self.hw}x{self.hw}x{self.c_in}->{self.c_out} s{self.stride}"
        )

    def arrays(
        self, batch: int, dtype: type = np.float32, seed: int = 0
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Random NHWC input, depthwise (K,K,C_in) and pointwise (C_in,C_out) weights. The
        input starts on a 64-byte boundary (``aligned``), as a layer's input does inside a
        network: every runtime's own tensors do (LiteRT's arena, torch's allocator, our
        results from 1 MB on); NumPy's large arrays start 16 bytes past one."""
        rng = np.random.default_rng(seed + self.number)
        x = rng.standard_normal((batch, self.hw, self.hw, self.c_in), dtype=np.float32)
        dw = rng.standard_normal((self.kernel, self.kernel, self.c_in), dtype=np.float32)
        pw = rng.standard_normal((self.c_in, self.c_out), dtype=np.float32)
        pw *= np.float32(1.0 / np.sqrt(self.c_in))
        return aligned(x, dtype), dw.astype(dtype), pw.astype(dtype)

    def conv2d_weight(self, dtype: type = np.float32) -> np.ndarray:
        """Random weights (K,K,C_in,C_out) of the layer's standard 3x3 convolution (the conv2d
        op of the bench), scaled by 1/sqrt(K*K*C_in)."""
        rng = np.random.default_rng(1000 + self.number)
        shape = (self.kernel, self.kernel, self.c_in, self.c_out)
        w = rng.standard_normal(shape, dtype=np.float32)
        w *= np.float32(1.0 / np.sqrt(self.kernel * self.kernel * self.c_in))
        return w.astype(dtype)


def aligned(a: np.ndarray, dtype: type | np.dtype | None = None) -> np.ndarray:
    """A C-contiguous copy of ``a`` (in ``dtype``) starting on a 64-byte boundary (NumPy only:
    the peers' worker processes import no kernels)."""
    dt = np.dtype(dtype or a.dtype)
    buf = np.empty(a.size * dt.itemsize + 64, np.uint8)
    k = -buf.ctypes.data % 64
    out = buf[k : k + a.size * dt.itemsize].view(dt).reshape(a.shape)
    out[...] = a
    return out


LAYERS: tuple[Layer, ...] = (
    Layer(1, "V1", 112, 32, 64, 1),
    Layer(2, "V1", 112, 64, 128, 2),
    Layer(3, "V1", 56, 128, 128, 1),
    Layer(4, "V1", 28, 256, 256, 1),
    Layer(5, "V1", 14, 512, 512, 1),
    Layer(6, "V1", 14, 512, 1024, 2),
    Layer(7, "V1", 7, 1024, 1024, 1),
    Layer(8, "V2", 56, 144, 24, 1),
    Layer(9, "V2", 28, 192, 64, 2),
    Layer(10, "V2", 14, 576, 96, 1),
    Layer(11, "V2", 7, 960, 160, 1),
)


def layer(number: int) -> Layer:
    """The suite row with this number (1-based)."""
    for lay in LAYERS:
        if lay.number == number:
            return lay
    raise ValueError(f"layer must be 1..{len(LAYERS)}; got {number!r}")
