"""The CPU backend: ``@njit(parallel=True)`` kernels, one module per operation family.

- ``depthwise.py``: the depthwise kernel and the depthwise family (row, pixel, 3x3 paths)
- ``pointwise.py``: the pointwise kernel and the GEMM micro-kernel (tile, register block, split)
- ``separable.py``: the fused separable kernel (depthwise tile -> GEMM, no intermediate tensor)
- ``conv2d.py``: the standard convolution
- ``layout.py``: NCHW <-> NHWC transposes, NHWC views, bias vectors
- ``backend.py``: ``CpuBackend`` (the api's hooks) and the kernel table, mirroring
  ``numba_dsconv/cuda/backend.py``
- ``peak.py``: the FMA peak (a register-resident vector FMA loop; a bench ceiling)
- ``_simd.py``: explicit SIMD vectors (an LLVM vector type and its intrinsics)
- ``_jit.py``: the jit decorators, the on-disk cache, the scalar activation
"""
