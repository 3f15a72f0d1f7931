"""numba_dsconv: the convolutions of a depthwise separable layer, accelerated with Numba.

Public names: :func:`conv2d`, :func:`depthwise`, :func:`pointwise`, :func:`separable`, their
gradients (:func:`conv2d_grad`, :func:`depthwise_grad`, :func:`pointwise_grad`,
:func:`separable_grad`), :func:`pack` (pointwise weights packed once for the CPU kernels),
:func:`cost`, and :func:`set_dask_threads` (Numba threads per task
when x is a dask array). PyTorch autograd ops and modules: ``numba_dsconv.torch``.
Each picks its backend (Numba CPU kernels or CUDA kernels) from ``device`` or from
where the input lives.
"""

from . import _config  # noqa: F401  (chooses a thread-safe Numba threading layer first)
from ._dask import set_dask_threads
from ._version import __version__
from .api import conv2d, depthwise, pointwise, separable
from .cost import Cost, cost
from .grad import (
    Conv2dGrads,
    DepthwiseGrads,
    PointwiseGrads,
    SeparableGrads,
    conv2d_grad,
    depthwise_grad,
    pointwise_grad,
    separable_grad,
)
from .packing import PackedWeights, pack

__all__ = [
    "Conv2dGrads",
    "Cost",
    "DepthwiseGrads",
    "PackedWeights",
    "PointwiseGrads",
    "SeparableGrads",
    "__version__",
    "conv2d",
    "conv2d_grad",
    "cost",
    "depthwise",
    "depthwise_grad",
    "pack",
    "pointwise",
    "pointwise_grad",
    "separable",
    "separable_grad",
    "set_dask_threads",
]
