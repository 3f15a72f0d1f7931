"""Every tunable of numba_dsconv in one place.

Tests patch these (for example ``SERIAL_MAX_MACS``) to drive small inputs down the parallel
paths; benchmarks read them to report what was run.
"""

from __future__ import annotations

import os
import sys
import threading

import numba
from numba.np.ufunc import parallel as _NUMBA_PARALLEL

# LLVM fast-math flags for every CPU kernel. ``nnan`` and ``ninf`` are deliberately absent:
# NaN and Inf must propagate exactly as the formulas say. ``reassoc``/``contract`` let LLVM
# vectorise reductions and form FMAs; the order chosen is fixed at compile time, so a given
# input always gives the same bits.
FASTMATH: frozenset[str] = frozenset({"nsz", "arcp", "contract", "afn", "reassoc"})

# Compiled kernels are cached on disk (next to the package, or NUMBA_CACHE_DIR).
CACHE: bool = os.environ.get("NUMBA_DSCONV_NO_CACHE", "") == ""

# Calls below this many multiply-adds run the serial build of a kernel: waking the thread pool
# costs more than the work itself.
SERIAL_MAX_MACS: int = 200_000


def _cache_bytes(level: int, kind: str) -> int:
    """The size of cpu0's level-``level`` cache of ``kind`` ("Data", "Unified") per Linux's
    sysfs; 0 where unknown (another OS, a VM that hides it)."""
    root = "/sys/devices/system/cpu/cpu0/cache"
    try:
        names = os.listdir(root)
    except OSError:
        return 0
    for name in names:
        try:
            with open(f"{root}/{name}/level") as f:
                lev = int(f.read())
            with open(f"{root}/{name}/type") as f:
                typ = f.read().strip()
            with open(f"{root}/{name}/size") as f:
                text = f.read().strip()
        except (OSError, ValueError):
            continue
        if lev == level and typ == kind:
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            try:
                return int(text.rstrip("KMG")) * scale
            except ValueError:
                return 0
    return 0


# The machine's per-core caches (the GEMM blocking below follows them; defaults where the OS
# does not say).
L1D_BYTES: int = _cache_bytes(1, "Data") or 32 * 1024
L2_BYTES: int = _cache_bytes(2, "Unified") or 1024 * 1024

# CPU GEMM tasks (pointwise, fused separable, conv2d): the A tile (pixels x reduction channels:
# the depthwise result in the fused kernel) is kept under this many bytes, half of L2 (less
# half a reduction block's weights where the kernel prefetches the next tile's input:
# ``pointwise._gemm_split``), so it stays there while every panel of output channels re-reads
# it; at K=1024 and 2 MiB of L2 a tile then holds ~250 pixels, so each weight panel read from
# memory serves that many rows ...
CPU_TILE_BYTES: int = L2_BYTES // 2
# ... and holds at most this many output pixels (chosen by measurement: BENCHMARKS.md, "Design
# measurements").
CPU_TILE_MAX_PIXELS: int = 256
# Reduction channels per block of the GEMM micro-kernel (a GEMM of reduction depth K <= KC runs in
# one block, K <= KC / 2 on the AVX-512 wide block, whose pairs of panels take half): between blocks
# each register block's partial sums go out to memory and come back. A block's KC x (two vectors)
# panel of packed weights (128 bytes per reduction channel) stays within a quarter of L2, beside the
# A tile's half, while every pixel row of the task reads it: 2048 with 1 MiB of L2, 4096 with 2 MiB.
# (Two thirds of L1, 256 with 48 KiB, kept the panel in L1 but cut K = 512-1024 into 2-8 blocks: the
# fused separable's rows 5-7 at N=8 ran 0.94-0.96x the time in one block on AMD Zen 5;
# BENCHMARKS.md, "Design measurements".)
CPU_GEMM_KC: int = max(64, min(4096, L2_BYTES // 4 // 128 // 16 * 16))

# `numba-dsconv tune` times other values of these three on this machine and writes the best
# to TUNING_FILE; they are read here at import, when the file was written on a machine with
# the same CPU and caches (NUMBA_DSCONV_NO_TUNING=1 ignores it).
TUNED = ("CPU_TILE_BYTES", "CPU_TILE_MAX_PIXELS", "CPU_GEMM_KC")
# ... and their cache-derived values above, before any tuning file is read
BLOCKING_DEFAULTS: dict[str, int] = {name: globals()[name] for name in TUNED}


def tuning_file() -> str:
    """Where `numba-dsconv tune` keeps its result: $NUMBA_DSCONV_TUNING_FILE, else beside the
    kernel cache when NUMBA_CACHE_DIR is set, else the user's cache directory."""
    path = os.environ.get("NUMBA_DSCONV_TUNING_FILE")
    if path:
        return path
    root = os.environ.get("NUMBA_CACHE_DIR")
    if not root:
        root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "numba_dsconv", "tuning.json")


def machine_key() -> dict[str, object]:
    """What a tuning result is valid for: the CPU model, its caches and core count."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": model, "l1d": L1D_BYTES, "l2": L2_BYTES, "cores": os.cpu_count()}


def _load_tuning() -> dict[str, int]:
    """The tuned values for this machine, or {} (no file, another machine; with a warning: an
    unreadable file, or one tuned around other defaults than this version's)."""
    if os.environ.get("NUMBA_DSCONV_NO_TUNING"):
        return {}
    path = tuning_file()
    if not os.path.exists(path):
        return {}
    import json

    try:
        with open(path) as f:
            data = json.load(f)
        values = {k: int(data["values"][k]) for k in TUNED}
        if any(v <= 0 for v in values.values()):
            raise ValueError("a value is not positive")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        import warnings

        warnings.warn(
            f"numba_dsconv: ignoring the tuning file {path} ({exc}); run `numba-dsconv tune` "
            f"again", RuntimeWarning, stacklevel=2,
        )  # fmt: skip
        return {}
    if data.get("machine") != machine_key():
        return {}
    made_for = data.get("defaults", BLOCKING_DEFAULTS)
    if made_for != BLOCKING_DEFAULTS:  # tuned around other cache-derived values (an older
        # rule): its values may pin what the new rule changed
        import warnings

        warnings.warn(
            f"numba_dsconv: ignoring the tuning file {path}: it was tuned around other default "
            f"blocking ({made_for}, now {BLOCKING_DEFAULTS}); run `numba-dsconv tune` again",
            RuntimeWarning, stacklevel=2,
        )  # fmt: skip
        return {}
    return values


TUNING: dict[str, int] = _load_tuning()  # what was applied ({}: the defaults above)
globals().update(TUNING)

# Backward kernels (cpu/backward.py): the output pixels are cut into chunks, each a task with
# its own partial sums of the weight gradients, added up in chunk order at the end. 0: one
# chunk per thread of Numba's pool (NUMBA_NUM_THREADS, by default the machine's cores) in
# whole images where they share out evenly, else two per thread in runs of rows (chunks that
# share input rows run in two phases); a number: at most that many. The cut depends on the
# problem and the pool's size, never on numba.set_num_threads: the gradients are the same bits
# with any number of threads launched. (More chunks than threads cost: every chunk's partial
# sums are written and read back; 16 chunks of 1 MB took ~1.5 ms more than 4 on 2 cores.)
BACKWARD_CHUNKS: int = 0
# ... each chunk with at least this many output pixels (below two chunks' worth the one chunk
# runs as two tasks, see cpu/backward.py: at N=1 on 14x14 outputs that beat three chunks in two
# phases, 0.71-0.80 of the time; 64 cut them so) ...
BACKWARD_MIN_PIXELS: int = 128
# ... and all their partial sums together within this many bytes.
BACKWARD_PARTIAL_BYTES: int = 32 * 1024 * 1024
# The backward's tiles: up to this many times CPU_TILE_MAX_PIXELS and CPU_TILE_BYTES. Its d pw
# GEMM reduces over a tile's pixels and reads and writes its partial sums (C*M x C_out) once per
# tile: 512-pixel tiles against 256, separable_grad N=8 layers 1-4 0.93-0.98x the time, N=1
# layers 2-3 0.96x; the A tile in twice the forward's bytes, layer 7 (4 MB of partial sums) N=8
# in tiles of 196 pixels instead of 98: 0.92x.
BACKWARD_TILE_FACTOR: int = 2


def _configure_threading_layer() -> None:
    """Prefer a thread-safe Numba threading layer (TBB or OpenMP).

    Numba's default fallback, ``workqueue``, aborts the whole process when two Python threads
    launch parallel kernels at once. Unless the user chose a layer (NUMBA_THREADING_LAYER), ask
    for ``threadsafe``; if that is unavailable, ``call_guard`` serialises calls instead.
    """
    global _CHOSE_LAYER, _ONLY_GNU_OMP
    if "NUMBA_THREADING_LAYER" in os.environ:
        return
    try:
        from numba.np.ufunc import parallel as _parallel

        if getattr(_parallel, "_is_initialized", False):
            return  # a layer is already running; calls are guarded below if it is workqueue
        available = {}
        for name, mod in (("omp", "omppool"), ("tbb", "tbbpool")):
            try:
                available[name] = __import__(f"numba.np.ufunc.{mod}", fromlist=["_"])
            except ImportError:
                continue
        if available:
            numba.config.THREADING_LAYER = "threadsafe"
            _CHOSE_LAYER = True
            omp = available.get("omp")
            _ONLY_GNU_OMP = "tbb" not in available and getattr(omp, "openmp_vendor", "") == "GNU"
    except Exception:  # pragma: no cover - never fail an import over a preference
        pass


_CHOSE_LAYER = False  # numba_dsconv asked for "threadsafe" (the user set no layer)
_ONLY_GNU_OMP = False  # ... and that can only be GNU OpenMP (no TBB installed)


_configure_threading_layer()

_WORKQUEUE_LOCK = threading.Lock()


class _NullGuard:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NULL_GUARD = _NullGuard()


# Whether parallel launches take _WORKQUEUE_LOCK: None until the threading layer has started
# (it never changes after that, but in a forked child, which asks again)
_LOCK_LAUNCHES: bool | None = None


def launch_lock() -> threading.Lock | None:
    """The lock every parallel CPU kernel launch holds: a process-wide one under ``workqueue``,
    which is not safe for concurrent launches; None under the thread-safe layers. Known once
    the layer has started (asked per launch until then: the first launch decides)."""
    global _LOCK_LAUNCHES
    if _LOCK_LAUNCHES is None:
        try:
            layer = numba.threading_layer()
        except ValueError:  # no parallel region has run yet
            safe = numba.config.THREADING_LAYER in ("threadsafe", "safe", "omp", "tbb")
            return None if safe else _WORKQUEUE_LOCK
        _LOCK_LAUNCHES = layer == "workqueue"
    return _WORKQUEUE_LOCK if _LOCK_LAUNCHES else None


def call_guard() -> threading.Lock | _NullGuard:
    """``launch_lock()`` as a context manager (a no-op one where there is no lock)."""
    lock = launch_lock()
    return _NULL_GUARD if lock is None else lock


# Set in a forked child whose parent had started a thread pool that cannot survive fork: GNU
# OpenMP (numba's "omp" layer with libgomp, the default where TBB is absent) kills the child's
# first parallel region ("fork() called from a process already using GNU OpenMP"), and a
# multiprocessing.Pool waiting on that child hangs. Such a child runs the serial build of every
# kernel: the same bits, one core. TBB, Intel OpenMP and workqueue pools survive fork. A child
# forked before our pool started takes workqueue where the pool would be GNU OpenMP (see
# _after_fork_in_child).
SERIAL_ONLY: bool = False
_FORKS = 0  # forks this process is a child of (a new _WORKQUEUE_LOCK each time)


def _pool_survives_fork() -> bool:
    """Whether this process's Numba thread pool (if one was started) works in a forked child.
    Runs in the child right after fork: no imports (another thread may have held the import
    lock at fork time), only modules already loaded."""
    par = sys.modules.get("numba.np.ufunc.parallel")
    if par is None or not getattr(par, "_is_initialized", False):
        return True  # no pool yet: the child starts its own
    try:
        layer = numba.threading_layer()
    except ValueError:
        return True
    omp = sys.modules.get("numba.np.ufunc.omppool")
    return layer != "omp" or getattr(omp, "openmp_vendor", "GNU") != "GNU"


def _after_fork_in_child() -> None:
    """Make this freshly forked child safe (registered with os.register_at_fork)."""
    global SERIAL_ONLY, _WORKQUEUE_LOCK, _LOCK_LAUNCHES, _FORKS
    _FORKS += 1  # launches prepared before the fork take their lock again (launch_settings)
    # another thread may have held the launch lock at fork time: in the child it would stay
    # held forever
    _WORKQUEUE_LOCK = threading.Lock()
    _LOCK_LAUNCHES = None  # the child may start another layer (below)
    par = sys.modules.get("numba.np.ufunc.parallel")
    if par is not None and getattr(par, "_is_initialized", False):
        if not _pool_survives_fork():
            SERIAL_ONLY = True
    elif _CHOSE_LAYER and _ONLY_GNU_OMP:
        # Our pool would be GNU OpenMP, and the parent may have used GNU OpenMP itself (torch
        # does, in a training step before DataLoader workers fork): the child's first parallel
        # region would then hang. workqueue survives fork; its launches are serialised.
        numba.config.THREADING_LAYER = "workqueue"


os.register_at_fork(after_in_child=_after_fork_in_child)


def use_parallel(work: int) -> bool:
    """Whether a call of ``work`` multiply-adds (or elements) runs the parallel build."""
    return work > SERIAL_MAX_MACS and not SERIAL_ONLY


def launch_settings(parallel: bool) -> tuple:
    """Everything here that a kernel's build choice and arguments depend on (the GEMM
    blocking, the serial threshold, and for a ``parallel`` launch the thread count): a launch
    prepared under other values (the NumPy fast path keeps one per call signature) is not
    used. Never starts the thread pool (a serial call must not: see SERIAL_ONLY)."""
    fixed = (CPU_TILE_BYTES, CPU_TILE_MAX_PIXELS, CPU_GEMM_KC, SERIAL_MAX_MACS, SERIAL_ONLY,
             _FORKS)  # fmt: skip
    if not parallel or SERIAL_ONLY:
        return fixed
    return (*fixed, thread_count())


def thread_count() -> int:
    """``numba.get_num_threads()`` (this thread's count: a dask task sets its own). Once the
    pool runs, read through a jitted function: get_num_threads takes two locks to check that
    the pool runs, ~1-2 us of every parallel call, and the threading layer's own ctypes
    function ~1 us (measured after a kernel, when the interpreter runs from cold caches);
    Numba's dispatch of a function without arguments is the code the kernel's launch runs
    next anyway (a parallel call's Python share, separable N=1: 0.94-0.97x)."""
    if _NUMBA_PARALLEL._is_initialized:
        return _running_pool_threads()
    return numba.get_num_threads()


@numba.njit(cache=False)  # (~0.1 s to compile, once per process, after the first kernel)
def _running_pool_threads() -> int:  # pragma: no cover - compiled
    return numba.get_num_threads()  # (compiled once the pool runs: compiling starts it)


# Numba threads per dask block task (numba_dsconv/_dask.py): 0 shares the cores out among the
# dask threads on the host (see _dask.task_threads); NUMBA_DSCONV_DASK_THREADS sets it.
def _dask_task_threads(text: str) -> int:
    try:
        n = int(text or 0)
    except ValueError:
        n = -1
    if n < 0:
        import warnings

        warnings.warn(
            f"NUMBA_DSCONV_DASK_THREADS must be a whole number >= 1 (or unset); got {text!r}: "
            f"ignored", RuntimeWarning, stacklevel=2,
        )  # fmt: skip
        return 0
    return n


DASK_TASK_THREADS: int = _dask_task_threads(os.environ.get("NUMBA_DSCONV_DASK_THREADS", ""))

# CUDA backward (cuda/backward.py): the tiles of its two GEMMs, (32 x 32 outputs, 16 per
# reduction chunk, 2 x 2 per thread: 256 threads) ...
CUDA_BACKWARD_TILE: tuple[int, int, int, int, int] = (32, 32, 16, 2, 2)
# ... pixels per range of its sums over pixels (partial sums added in order: the ranges are
# cut from the problem alone, so the bits do not depend on the GPU) ...
CUDA_BACKWARD_SPLIT_PIXELS: int = 2048
# ... and the bytes of the band of the depthwise stage's gradient it holds at a time.
CUDA_BACKWARD_BAND_BYTES: int = 64 * 1024 * 1024

# CUDA: threads per block for the one-thread-per-element kernels (depthwise, copies).
# Tests patch these small so tiny inputs still span several blocks in the simulator.
CUDA_THREADS: int = 256
# Tiled GEMM kernels (pointwise, fused separable, conv2d): (TP pixels, TN output channels,
# TK reduction channels per shared-memory chunk, RP x RN outputs per thread).
CUDA_GEMM_TILE: tuple[int, int, int, int, int] = (64, 64, 16, 4, 4)
# Blocks in a launch at most; kernels grid-stride over the rest (grid x only).
CUDA_MAX_BLOCKS: int = 1 << 18
# The fused separable kernel's halo tiles (cuda/separable.py): "auto" uses them for
# specialised geometries with dilation 1 when rectangles of output pixels cover the output
# with no more tiles than runs of flattened pixels do (and fit in shared memory); "always"
# wherever they are possible (tests, benchmarks); "never" keeps the flat tiles.
CUDA_HALO: str = "auto"
# The register budget of the GEMM kernels, per thread: launch bounds asking for as many
# resident blocks per multiprocessor as 64K registers allow at this budget (2 blocks of 256
# threads at 128); 0 leaves registers to the compiler (`python benchmarks/cuda_resources.py`
# shows what ptxas then allocates).
CUDA_GEMM_REGISTERS: int = 128
