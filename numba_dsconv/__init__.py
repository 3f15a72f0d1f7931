"""numba_dsconv: the convolutions of a depthwise separable layer, accelerated with Numba.

Public names: :func:`conv2d`, :func:`depthwise`, :func:`pointwise`, :func:`separable`,
:func:`cost`, and :func:`set_dask_threads` (Numba threads per task when x is a dask array).
Each picks its backend (Numba CPU kernels or CUDA kernels) from ``device`` or from
where the input lives.
"""

from . import _config  # noqa: F401  (chooses a thread-safe Numba threading layer first)
from ._dask import set_dask_threads
from ._version import __version__
from .api import conv2d, depthwise, pointwise, separable
from .cost import Cost, cost

__all__ = [
    "Cost",
    "__version__",
    "conv2d",
    "cost",
    "depthwise",
    "pointwise",
    "separable",
    "set_dask_threads",
]
