"""Dask arrays in, lazy dask arrays out: every public operation on a chunked ``x``.

The in-memory call is the only kernel: each output block is that call on the input region its
output pixels read (a halo wherever a window crosses an input chunk), with the zero padding of
the whole image folded into the blocks at its borders. So every output pixel is computed by the
same code, from the same values, as in the in-memory call on the whole array: the result is
equal bit for bit, for any chunking.

Per spatial axis (``_axis_blocks``): output position o reads input rows
[o*s - lo, o*s - lo + (K-1)*d + 1) (stride s, dilation d, padding lo before). Each output
position is assigned to the input chunk holding its window's centre (clamped into the image),
so output blocks follow the input chunks ('same' at stride 1 keeps them exactly; chunk borders
need not be multiples of the stride). A block's input is the slice of x its
windows cover (dask gathers the halo from the neighbouring chunks), padded only where it
reaches past the image. Batch chunks map directly (no halo); channels are gathered into one
chunk for the ops that mix them (conv2d, pointwise, separable), while depthwise keeps the
channel chunks (its weights and bias are sliced per chunk), their borders moved to whole
pairs of SIMD vectors, and no chunk left with less than one vector: the 3x3 kernel computes
every channel of an array of one vector or more with the same vector code (the last vector
moved back to end at C), but an array of fewer channels with a scalar loop whose sum, compiled
with fast-math reassociation, rounds differently.

Nothing here is imported unless an ``x`` is a dask array; ``dask`` is an extra.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numba
import numpy as np

from . import _config, api


def is_dask(a: object) -> bool:
    return type(a).__module__.startswith("dask.") and hasattr(a, "dask") and hasattr(a, "chunks")


# --------------------------------------------------------------------------------------------
# threads inside a task


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


_HOST_THREADS: dict[str, int] = {}  # per worker address: dask threads on its host
_warned_share = False


def _threads_on_this_host() -> int | None:
    """Dask threads of every worker on this worker's host (asked of the scheduler once per
    worker); None outside a distributed worker."""
    dist = sys.modules.get("distributed")
    if dist is None:
        return None
    try:
        worker = dist.get_worker()
    except ValueError:
        return None
    found = _HOST_THREADS.get(worker.address)
    if found is not None:
        return found
    mine = int(worker.state.nthreads)
    host = worker.address.rsplit(":", 1)[0]
    try:
        client = dist.get_client()
        try:
            workers = client.scheduler_info(n_workers=-1)["workers"]
        except TypeError:  # a distributed without the keyword lists every worker anyway
            workers = client.scheduler_info()["workers"]
        total = sum(int(w["nthreads"]) for a, w in workers.items() if a.rsplit(":", 1)[0] == host)
    except Exception as exc:  # a lost connection: assume the host's cores are all taken
        global _warned_share
        if not _warned_share:
            _warned_share = True
            warnings.warn(
                f"numba_dsconv: could not ask the scheduler how many dask threads share this "
                f"host ({exc}); block tasks run Numba on 1 thread (set NUMBA_DSCONV_DASK_THREADS "
                f"to choose)",
                RuntimeWarning,
                stacklevel=2,
            )
        total = _usable_cores()
    _HOST_THREADS[worker.address] = max(total, mine)
    return _HOST_THREADS[worker.address]


def _pool_size(cores: int) -> int:
    """Threads of dask's threaded (or processes) scheduler: a configured ``pool``'s size, else
    the ``num_workers`` setting, else the cores (dask's default). A ``num_workers=`` passed to
    ``compute`` itself is not visible here: set it with dask.config or set_dask_threads."""
    import dask

    pool = dask.config.get("pool", None)
    size = getattr(pool, "_max_workers", None) or dask.config.get("num_workers", None)
    return int(size or cores)


def task_threads() -> int | None:
    """Numba threads for one block task: ``NUMBA_DSCONV_DASK_THREADS`` (or
    ``_config.DASK_TASK_THREADS``) where set; in a distributed worker, the usable cores divided
    by the dask threads of all workers on the host; in a thread of dask's threaded scheduler or
    a process of its multiprocessing one, the cores divided by the pool size; None (Numba's
    own count) in the main thread of the main process (the synchronous scheduler)."""
    if _config.DASK_TASK_THREADS:
        return int(_config.DASK_TASK_THREADS)
    cores = _usable_cores()
    host_threads = _threads_on_this_host()
    if host_threads is not None:
        return max(1, cores // host_threads)
    in_main = threading.current_thread() is threading.main_thread()
    if in_main and multiprocessing.parent_process() is None:
        return None
    return max(1, cores // _pool_size(cores))


@contextlib.contextmanager
def _numba_threads(n: int | None) -> Iterator[None]:
    """Numba's (thread-local) thread count set to ``n`` for the block, then restored."""
    if n is None:
        yield
        return
    n = min(n, numba.config.NUMBA_NUM_THREADS)
    previous = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        yield
    finally:
        numba.set_num_threads(previous)


def block(xb: Any, *arrays: Any, op: str, biases: tuple[str, ...], kwargs: dict) -> Any:
    """One output block: the in-memory call, ``arrays`` being the weights, then the biases
    named in ``biases`` (module-level: tasks pickle it by reference, so workers import the
    package and reuse its disk cache instead of compiling pickled code)."""
    n = len(arrays) - len(biases)
    named = dict(zip(biases, arrays[n:], strict=True))
    with _numba_threads(task_threads()):
        return getattr(api, op)(xb, *arrays[:n], **kwargs, **named)


def threads_in_a_task(_: Any) -> np.ndarray:
    """The Numba thread count a block task runs with (for tests and docs)."""
    with _numba_threads(task_threads()):
        return np.array([numba.get_num_threads()])


# --------------------------------------------------------------------------------------------
# the graph


def _axis_blocks(
    size: int, chunks: tuple[int, ...], k: int, s: int, d: int, lo: int, hi: int, out: int
) -> list[tuple[int, int, int, int, int, int]]:
    """Output blocks of one spatial axis: (o0, o1, a, b, before, after) = outputs o0..o1-1 from
    input rows a..b-1 with ``before``/``after`` zero rows (the image's padding where reached)."""
    span = (k - 1) * d + 1
    bounds = np.cumsum(chunks)[:-1]  # where input chunks 1, 2, ... start
    # each output belongs to the chunk holding its window's centre: 'same' at stride 1 keeps
    # the input chunks exactly (the first row would shift every chunk by the padding)
    centre = np.arange(out, dtype=np.int64) * s - lo + (span - 1) // 2
    owner = np.searchsorted(bounds, np.clip(centre, 0, size - 1), side="right")
    cuts = [0, *(np.flatnonzero(np.diff(owner)) + 1).tolist(), out]

    def reads_image(o0: int, o1: int) -> bool:
        return (o1 - 1) * s - lo + span > 0 and o0 * s - lo < size

    merged: list[list[int]] = []
    for o0, o1 in zip(cuts[:-1], cuts[1:], strict=True):
        # a block whose windows read only padding (at either end) joins its neighbour
        if merged and not (reads_image(*merged[-1]) and reads_image(o0, o1)):
            merged[-1][1] = o1
        else:
            merged.append([o0, o1])
    if len(merged) == 1:  # the whole axis: exactly the in-memory call's padding
        return [(0, out, 0, size, lo, hi)]
    plan = []
    for o0, o1 in merged:
        a, b = o0 * s - lo, (o1 - 1) * s - lo + span
        plan.append((o0, o1, max(a, 0), min(b, size), max(0, -a), max(0, b - size)))
    return plan


def _stand_in(x: Any) -> Any:
    """An array of x's shape, dtype and chunk type (NumPy or CuPy) that holds no memory (one
    zero, broadcast): what the validation sees in place of x."""
    meta = getattr(x, "_meta", None)
    xp = np
    if meta is not None and type(meta).__module__.startswith("cupy"):
        import cupy as xp  # type: ignore[no-redef]
    elif type(meta) is not np.ndarray:
        raise TypeError(
            f"x is a dask array of {type(meta).__module__}.{type(meta).__name__} chunks; "
            f"numba_dsconv takes NumPy or CuPy chunks"
        )
    dtype = x.dtype.newbyteorder("=") if x.dtype.kind == "f" else x.dtype  # (no big copy)
    return xp.broadcast_to(xp.zeros((), dtype=dtype), tuple(int(v) for v in x.shape))


def lazy(fn: Callable[..., Any], x: Any, args: tuple, kwargs: dict) -> Any:
    """``fn(x, *args, **kwargs)`` for a dask array ``x``, as a lazy dask array."""
    import dask
    import dask.array as da

    op = fn.__name__
    if kwargs.get("out") is not None:
        raise TypeError(
            "out= cannot be used when x is a dask array: the result is lazy (write it with "
            "dask, e.g. dask.array.store or .to_zarr)"
        )
    if any(np.isnan(c) for axis in x.chunks for c in axis):
        raise ValueError(
            "x has unknown chunk sizes (NaN chunks, e.g. after boolean indexing); call "
            "x.compute_chunk_sizes() first"
        )
    args = tuple(a if hasattr(a, "shape") else np.asarray(a) for a in args)
    # Every check of the in-memory call (the same errors: a dask weight or bias is refused
    # there), on a stand-in of x's shape that holds no memory; the call's spec and dtype.
    stand_in = _stand_in(x)
    p = api.plan(fn, stand_in, args, kwargs)
    spec = p.spec
    if not spec.batched:  # unbatched: a batch of one, dropped at the end
        return lazy(fn, x[None], args, kwargs)[0]
    layout = spec.layout
    n_ax, h_ax, w_ax, c_ax = (0, 1, 2, 3) if layout == "NHWC" else (0, 2, 3, 1)
    rows = _axis_blocks(spec.h, x.chunks[h_ax], spec.kh, spec.stride_h, spec.dilation_h,
                        spec.pad_top, spec.pad_bottom, spec.out_h)  # fmt: skip
    cols = _axis_blocks(spec.w, x.chunks[w_ax], spec.kw, spec.stride_w, spec.dilation_w,
                        spec.pad_left, spec.pad_right, spec.out_w)  # fmt: skip
    meta = stand_in[(slice(0, 0),) * 4].astype(p.dtype)

    static = {k: v for k, v in kwargs.items() if k not in api.BIAS_PARAMS[op]}
    given_biases = {k: kwargs[k] for k in api.BIAS_PARAMS[op] if kwargs.get(k) is not None}

    def channel_group(xc: Any, weights: tuple, biases: dict, c_out: int) -> Any:
        # weights and biases enter the graph once (one key each), not once per task
        arrays = tuple(dask.delayed(a, pure=True) for a in (*weights, *biases.values()))
        bias_names = tuple(biases)
        grid = []
        for o0, o1, a, bb, pt, pb in rows:
            line = []
            for q0, q1, c0, c1, pl, pr in cols:
                region = [slice(None)] * 4
                region[h_ax], region[w_ax] = slice(a, bb), slice(c0, c1)
                sub = xc[tuple(region)].rechunk({h_ax: -1, w_ax: -1, c_ax: -1})
                chunks = [None] * 4
                chunks[n_ax] = sub.chunks[n_ax]
                chunks[h_ax], chunks[w_ax], chunks[c_ax] = (o1 - o0,), (q1 - q0,), (c_out,)
                block_kwargs = dict(static)
                if op != "pointwise":
                    block_kwargs["padding"] = ((pt, pb), (pl, pr))
                line.append(
                    da.map_blocks(
                        block, sub, *arrays, op=op, biases=bias_names, kwargs=block_kwargs,
                        chunks=tuple(chunks), dtype=p.dtype, meta=meta,
                    )
                )  # fmt: skip
            grid.append(line[0] if len(line) == 1 else da.concatenate(line, axis=w_ax))
        return grid[0] if len(grid) == 1 else da.concatenate(grid, axis=h_ax)

    if op != "depthwise" or len(x.chunks[c_ax]) == 1:
        return channel_group(x, args, given_biases, spec.c_out)
    # depthwise keeps x's channel chunks: weights and bias sliced per chunk; chunk borders
    # moved (an explicit rechunk) to whole pairs of vectors of the result dtype, so every
    # channel takes the same kernel path as in the whole array (see the module doc)
    from .cpu._simd import VEC_BYTES

    lanes = max(1, 2 * VEC_BYTES // np.dtype(p.dtype).itemsize)
    sizes = x.chunks[c_ax]
    cuts = sorted({int(e) // lanes * lanes for e in np.cumsum(sizes)[:-1]} - {0})
    if cuts and spec.c_in - cuts[-1] < lanes // 2:  # a last chunk of less than one vector
        cuts.pop()  # would take the scalar tail, where the whole array takes a vector
    aligned = tuple(np.diff([0, *cuts, spec.c_in]).tolist())
    if aligned != tuple(sizes):
        x = x.rechunk({c_ax: aligned})
    if len(x.chunks[c_ax]) == 1:
        return channel_group(x, args, given_biases, spec.c_out)
    dw = args[0]
    mult = dw.shape[3] if dw.ndim == 4 else 1
    bias = kwargs.get("bias")
    groups, c0 = [], 0
    for size in x.chunks[c_ax]:
        region = [slice(None)] * 4
        region[c_ax] = slice(c0, c0 + size)
        part_bias = {} if bias is None else {"bias": bias[c0 * mult : (c0 + size) * mult]}
        part = (dw[:, :, c0 : c0 + size],)
        groups.append(channel_group(x[tuple(region)], part, part_bias, size * mult))
        c0 += size
    return da.concatenate(groups, axis=c_ax)


def set_dask_threads(n: int | None) -> None:
    """Numba threads for every block task of this process (None: share the cores, see
    ``task_threads``). On a cluster: ``client.run(numba_dsconv.set_dask_threads, 1)``."""
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise ValueError(f"n must be None or an int >= 1; got {n!r}")
    _config.DASK_TASK_THREADS = 0 if n is None else n
