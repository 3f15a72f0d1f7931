"""The jit decorators of the CPU kernels, their on-disk cache, and the scalar activation.

Every ``@njit`` function of ``numba_dsconv.cpu`` is made here: ``kernel`` (a parallel build and
a serial one of the same body, with its argument builder) and ``helper`` (a function the kernels
call).

Cache: Numba reuses a cached function while its own source file is unchanged, so an edit to a
helper in another file left every kernel calling it stale. Here a cached entry is stamped with
the content hash of every source file the kernels are built from (``KERNEL_SOURCES``): editing
any of them recompiles every kernel and helper, and nothing stale is ever loaded.
"""

from __future__ import annotations

import functools
import hashlib
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from numba import njit
from numba.core import caching

from .. import _config
from .._spec import Activation

_PACKAGE = Path(__file__).resolve().parent.parent

# The files whose code the compiled kernels contain or whose constants they freeze: the CPU
# package and the top-level modules it imports (tests/test_cache.py checks that this covers
# every module the package imports from numba_dsconv).
KERNEL_SOURCES: tuple[Path, ...] = (
    *sorted((_PACKAGE / "cpu").glob("*.py")),
    _PACKAGE / "_config.py",
    _PACKAGE / "_dispatch.py",
    _PACKAGE / "_spec.py",
    _PACKAGE / "packing.py",
)


@functools.cache
def sources_stamp() -> str:
    """The content hash of every kernel source file (read once per process)."""
    h = hashlib.sha256()
    for path in KERNEL_SOURCES:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


class _SourcesStamp:
    def get_source_stamp(self) -> tuple[str, str]:  # numba compares and pickles it
        return ("numba_dsconv kernel sources", sources_stamp())


def _stamped(name: str) -> Any:
    """Numba's locator ``name`` (spelled with a leading underscore before numba 0.61), with
    the package-wide source stamp."""
    base = getattr(caching, name, None) or getattr(caching, "_" + name)
    return type(f"Stamped{name}", (_SourcesStamp, base), {})


class _KernelCacheImpl(caching.CompileResultCacheImpl):
    _locator_classes = [
        _stamped("UserProvidedCacheLocator"),  # NUMBA_CACHE_DIR
        _stamped("InTreeCacheLocator"),  # __pycache__ next to the source
        _stamped("UserWideCacheLocator"),  # the user's cache directory
    ]


class _TolerantIndex(caching.IndexDataCacheFile):
    def _load_index(self) -> dict:
        # An index Numba cannot read back (written by another version of this package that
        # pickled an argument type it no longer has, or truncated) is a cache miss, not an
        # error: the kernel is compiled again and the index rewritten.
        try:
            return super()._load_index()
        except Exception:
            return {}


_CACHE_HELP = (
    "set NUMBA_CACHE_DIR to a writable directory to keep them between processes "
    "(or NUMBA_DSCONV_NO_CACHE=1 to silence this)"
)
_warned = False


def _warn_no_cache(why: str) -> None:
    """Warn, once per process, that kernels run without the disk cache, and why."""
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"numba_dsconv: {why}; the kernels run, but are compiled again in every process: "
            f"{_CACHE_HELP}",
            RuntimeWarning,
            stacklevel=3,
        )


class KernelCache(caching.FunctionCache):
    """Numba's function cache, invalidated by any change to KERNEL_SOURCES, and tolerant of
    an index it cannot read and of a disk it cannot read or write (a full disk, a directory
    made read-only after start): the kernel runs uncached, with a warning."""

    _impl_class = _KernelCacheImpl

    def __init__(self, py_func: Any) -> None:
        super().__init__(py_func)
        self._cache_file.__class__ = _TolerantIndex

    def load_overload(self, sig: Any, target_context: Any) -> Any:
        try:
            return super().load_overload(sig, target_context)
        except OSError as exc:
            _warn_no_cache(f"the kernel cache in {self._cache_path} cannot be read ({exc})")
            return None

    def save_overload(self, sig: Any, data: Any) -> None:
        try:
            super().save_overload(sig, data)
        except OSError as exc:
            _warn_no_cache(f"the kernel cache in {self._cache_path} cannot be written ({exc})")


_JIT_OPTS = dict(fastmath=set(_config.FASTMATH), nogil=True)


def _jit(fn: Callable[..., Any], parallel: bool) -> Any:
    disp = njit(parallel=parallel, cache=False, **_JIT_OPTS)(fn)
    if _config.CACHE:
        try:
            disp._cache = KernelCache(disp.py_func)  # what Dispatcher.enable_caching does
        except RuntimeError as exc:  # Numba found no writable cache location anywhere
            _warn_no_cache(f"no writable location for the kernel cache ({exc})")
    return disp


def helper(fn: Callable[..., Any]) -> Any:
    """A function the kernels call. Not IR-inlined (``inline="always"`` on every helper made
    the parallel separable kernel much slower to compile cold); LLVM inlines it or calls it.
    A call may bind to the helper's own separately compiled code (see ``inlined``)."""
    return _jit(fn, parallel=False)


def inlined(fn: Callable[..., Any]) -> Any:
    """A helper inlined into its callers in Numba's IR: the GEMM register blocks.

    A helper is compiled on its own (its own library, its code loaded) before the functions
    that call it, and Numba links its IR into theirs as ``linkonce_odr``: where LLVM keeps a
    call, the JIT binds it to the first definition loaded, the helper compiled alone, without
    its callers' constants. The register blocks compiled alone spilled their accumulators to
    the stack (96 spills in gemm_block_wide's code): in a process that compiled the kernels
    (the first run, or without the disk cache) the GEMMs ran at 35-40 % of the FMA peak, where
    the same kernels loaded from the cache (one object: its own copies) ran at 85-90 %. Inlined
    in the IR there is no separate definition to bind to. Cold compiles take ~1.3x as long."""
    return njit(inline="always", **_JIT_OPTS)(fn)


class Kernel(NamedTuple):
    """A kernel's two builds and the one function that assembles its arguments."""

    parallel: Any
    serial: Any
    args: Callable[..., Callable[..., tuple[Any, ...]]] | None


def kernel(
    fn: Callable[..., Any], args: Callable[..., Callable[..., tuple[Any, ...]]] | None
) -> Kernel:
    """Compile one kernel body twice: ``parallel=True`` and a serial build for tiny inputs;
    ``args(spec, dtype, parallel)`` is the only place that knows the kernel's parameter order:
    it works out what a call signature fixes (the task split, the geometry, the activation
    codes) once and returns ``build(x, weights, biases, out)``, the argument tuple of one call
    (the NumPy fast path keeps ``build`` per signature: a call then runs little Python, which
    after a kernel has streamed megabytes through the caches runs several times slower than
    its warm timing).

    The serial build is a clone with its own ``__qualname__`` so the two never share an entry
    in Numba's on-disk cache (whose index key does not include the ``parallel`` flag).
    """
    clone = types.FunctionType(
        fn.__code__, fn.__globals__, fn.__name__ + "_serial", fn.__defaults__, fn.__closure__
    )
    clone.__qualname__ = fn.__qualname__ + "_serial"
    clone.__module__ = fn.__module__
    return Kernel(_jit(fn, parallel=True), _jit(clone, parallel=False), args)


# Activation codes as the kernels see them (Numba freezes these globals as constants).
NO_ACTIVATION = int(Activation.NONE)
RELU6 = int(Activation.RELU6)


@helper
def activated(v, code):  # pragma: no cover - compiled
    """act(v) for the Activation ``code``. NaN stays NaN: only v < 0 and v > 6 change."""
    if code != NO_ACTIVATION and v < 0:
        return 0.0
    if code == RELU6 and v > 6:
        return 6.0
    return v
