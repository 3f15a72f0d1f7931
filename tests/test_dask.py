"""Dask arrays in, lazy dask arrays out (numba_dsconv/_dask.py).

Random configurations (op x layout x kernel 1-5 x stride 1-3 x padding x dilation x irregular
chunkings of batch, rows, columns and channels x dtype x biases and activations): the lazy
array's shape, dtype, meta and chunks are those of the computed result (every computed block
has its declared shape), and the result equals the in-memory call bit for bit under the
synchronous, threaded and distributed schedulers. Then the threads a task runs with, an image
larger than the workers' memory, the workqueue threading layer, and bad inputs.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from helpers import bitwise_equal, lib_fn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")
distributed = pytest.importorskip("distributed")

import numba_dsconv as nd  # noqa: E402
from numba_dsconv import _config, _dask  # noqa: E402


@pytest.fixture(scope="module")
def client():
    """Two single-threaded worker processes (spawned: each imports the package and loads the
    kernels from the disk cache)."""
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        distributed.Client(cluster) as c,
    ):
        yield c


def _chunks(draw, size: int) -> tuple[int, ...]:
    """An irregular chunking of one axis (sizes 1..size, any split)."""
    if size <= 1:
        return (size,)
    cuts = sorted(draw(st.sets(st.integers(1, size - 1), max_size=min(4, size - 1))))
    edges = [0, *cuts, size]
    return tuple(b - a for a, b in zip(edges[:-1], edges[1:], strict=True))


@st.composite
def configs(draw):
    op = draw(st.sampled_from(["separable", "depthwise", "conv2d", "pointwise"]))
    layout = draw(st.sampled_from(["NHWC", "NCHW"]))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    n, h, w = draw(st.integers(0, 3)), draw(st.integers(4, 17)), draw(st.integers(4, 17))
    # 16, 20, 33: whole SIMD vectors and a scalar tail (depthwise keeps channel chunks)
    c = draw(st.sampled_from([1, 3, 8, 16, 20, 33]))
    k = draw(st.tuples(st.integers(1, 5), st.integers(1, 5)))
    stride = draw(st.tuples(st.integers(1, 3), st.integers(1, 3)))
    dil = draw(st.tuples(st.integers(1, 2), st.integers(1, 2)))
    pad = draw(
        st.one_of(
            st.sampled_from(["valid", "same"]),
            st.integers(0, 3),
            st.tuples(st.tuples(st.integers(0, 4), st.integers(0, 4)),
                      st.tuples(st.integers(0, 4), st.integers(0, 4))),
        )
    )  # fmt: skip
    mult = draw(st.sampled_from([1, 2])) if op in ("depthwise", "separable") else 1
    chunks = (_chunks(draw, n), _chunks(draw, h), _chunks(draw, w), _chunks(draw, c))
    acts = {"activation": draw(st.sampled_from([None, "relu", "relu6"]))}
    if op == "separable":
        acts["mid_activation"] = draw(st.sampled_from([None, "relu6"]))
    biased = draw(st.booleans())
    return op, layout, dtype, (n, h, w, c), k, stride, dil, pad, mult, chunks, acts, biased


def _arguments(cfg, seed=0):
    op, layout, dtype, (n, h, w, c), k, stride, dil, pad, mult, chunks, acts, biased = cfg
    r = np.random.default_rng(seed)
    x = r.standard_normal((n, h, w, c)).astype(dtype)
    dw = r.standard_normal((*k, c, mult) if mult > 1 else (*k, c)).astype(dtype)
    pw = r.standard_normal((c * mult, 5)).astype(dtype)
    full = r.standard_normal((*k, c, 4)).astype(dtype)
    weights = {"separable": (dw, pw), "depthwise": (dw,), "conv2d": (full,),
               "pointwise": (pw[:c],)}[op]  # fmt: skip
    kwargs = dict(acts, layout=layout)
    if op != "pointwise":
        kwargs.update(stride=stride, dilation=dil, padding=pad)
    if biased:
        c_out = {"separable": 5, "depthwise": c * mult, "conv2d": 4, "pointwise": 5}[op]
        kwargs["bias"] = r.standard_normal(c_out).astype(dtype)
        if op == "separable":
            kwargs["dw_bias"] = r.standard_normal(c * mult).astype(dtype)
    if layout == "NCHW":
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        chunks = (chunks[0], chunks[3], chunks[1], chunks[2])
    return x, weights, kwargs, chunks


def _check_lazy(lazy, want, computed):
    """Metadata known before computing equals the computed result's; every block as declared."""
    assert lazy.shape == want.shape == computed.shape
    assert lazy.dtype == want.dtype == computed.dtype
    assert type(lazy._meta) is type(computed) and lazy._meta.dtype == want.dtype
    blocks = lazy.to_delayed()
    parts = dask.compute(*blocks.ravel(), scheduler="sync")
    for index, part in zip(np.ndindex(blocks.shape), parts, strict=True):
        declared = tuple(lazy.chunks[axis][i] for axis, i in enumerate(index))
        assert part.shape == declared, (index, part.shape, declared)


SETTINGS = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)


@SETTINGS
@given(cfg=configs())
def test_lazy_equals_in_memory_bitwise(cfg, client):
    op = cfg[0]
    x, weights, kwargs, chunks = _arguments(cfg)
    try:
        want = lib_fn(op)(x, *weights, **kwargs)
    except ValueError as exc:  # a geometry the in-memory call refuses is refused lazily too
        with pytest.raises(ValueError, match=re.escape(str(exc)[:60])):
            lib_fn(op)(da.from_array(x, chunks=chunks), *weights, **kwargs)
        return
    xd = da.from_array(x, chunks=chunks)
    lazy = lib_fn(op)(xd, *weights, **kwargs)
    assert isinstance(lazy, da.Array)
    sync = lazy.compute(scheduler="sync")
    _check_lazy(lazy, want, sync)
    assert bitwise_equal(sync, want)
    assert bitwise_equal(lazy.compute(scheduler="threads"), want)
    assert bitwise_equal(client.compute(lazy).result(), want)


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_unbatched_and_single_chunk(layout):
    r = np.random.default_rng(1)
    x = r.standard_normal((9, 8, 4) if layout == "NHWC" else (4, 9, 8)).astype(np.float32)
    dw, pw = r.standard_normal((3, 3, 4)).astype(np.float32), r.standard_normal((4, 6))
    for chunks in (x.shape, (2, 3, 4) if layout == "NHWC" else (4, 2, 3)):
        lazy = nd.separable(da.from_array(x, chunks=chunks), dw, pw, padding="same",
                            stride=2, layout=layout)  # fmt: skip
        want = nd.separable(x, dw, pw, padding="same", stride=2, layout=layout)
        got = lazy.compute(scheduler="sync")
        _check_lazy(lazy, want, got)
        assert bitwise_equal(got, want)


def test_batch_only_chunking_maps_blocks_directly():
    """Whole images per chunk: one task per batch chunk (no halo, no rechunk of x)."""
    r = np.random.default_rng(2)
    x = r.standard_normal((6, 10, 10, 8)).astype(np.float32)
    xd = da.from_array(x, chunks=(2, 10, 10, 8))
    lazy = nd.separable(xd, r.standard_normal((3, 3, 8)), r.standard_normal((8, 4)), padding=1)
    assert lazy.numblocks == (3, 1, 1, 1)
    own = [k for k in dict(lazy.__dask_graph__()) if k[0] == lazy.name]
    assert len(own) == 3


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize(
    ("dtype", "c", "chunks"),
    [(np.float32, 20, (3, 17)), (np.float32, 20, (10, 10)), (np.float32, 33, (1, 16, 16)),
     (np.float64, 12, (6, 6)), (np.float32, 40, (17, 23)), (np.float32, 80, (16, 16, 48)),
     (np.float64, 40, (8, 8, 24)), (np.float32, 40, (32, 8)), (np.float32, 33, (32, 1)),
     (np.float64, 20, (16, 4)), (np.float32, 72, (32, 32, 8))],
)  # fmt: skip
def test_depthwise_channel_chunks_keep_vector_positions(dtype, c, chunks, layout):
    """The 3x3 kernel sums a channel's taps differently in its vector code and in the scalar
    loop of an array of less than one vector: channel chunk borders move to whole pairs of
    vectors and no chunk keeps less than one vector, so every channel keeps its path."""
    r = np.random.default_rng(12)
    x = r.standard_normal((2, 9, 9, c)).astype(dtype)
    dw = r.standard_normal((3, 3, c)).astype(dtype)
    bias = r.standard_normal(c).astype(dtype)
    if layout == "NCHW":
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    ch = (1, 4, 5, chunks) if layout == "NHWC" else (1, chunks, 4, 5)
    want = nd.depthwise(x, dw, bias=bias, padding=1, layout=layout)
    lazy = nd.depthwise(da.from_array(x, chunks=ch), dw, bias=bias, padding=1, layout=layout)
    assert bitwise_equal(lazy.compute(scheduler="sync"), want)


@pytest.mark.parametrize("op", ["separable", "depthwise", "conv2d", "pointwise"])
def test_parallel_builds_too(op, monkeypatch):
    """Every block on the parallel build (the in-memory call too): still bit for bit."""
    monkeypatch.setattr(_config, "SERIAL_MAX_MACS", 0)
    cfg = (op, "NHWC", np.float32, (2, 13, 11, 20), (3, 3), (2, 1), (1, 2), "same", 1,
           ((1, 1), (4, 9), (3, 3, 5), (5, 15)), {"activation": "relu"}, True)  # fmt: skip
    x, weights, kwargs, chunks = _arguments(cfg)
    want = lib_fn(op)(x, *weights, **kwargs)
    lazy = lib_fn(op)(da.from_array(x, chunks=chunks), *weights, **kwargs)
    for scheduler in ("sync", "threads"):
        assert bitwise_equal(lazy.compute(scheduler=scheduler), want)


def test_same_padding_keeps_the_input_chunks():
    """'same' at stride 1 keeps x's chunks (regular chunks for to_zarr); stride 2 halves them."""
    x = da.zeros((1, 64, 64, 4), chunks=(1, 16, 16, 4), dtype=np.float32)
    k = np.ones((3, 3, 4), np.float32)
    assert nd.depthwise(x, k, padding="same").chunks[1:3] == ((16,) * 4, (16,) * 4)
    assert nd.depthwise(x, k, padding="same", stride=2).chunks[1:3] == ((8,) * 4, (8,) * 4)


def test_big_endian_dask_input_builds_no_copy():
    """The stand-in that validates a big-endian x is native and zero-strided (no full-size
    byte swap while the graph is built), and the result is the native call's."""
    r = np.random.default_rng(13)
    x = r.standard_normal((2, 12, 12, 4)).astype(">f4")
    xd = da.from_array(x, chunks=(1, 5, 7, 4))
    stand_in = _dask._stand_in(xd)
    assert stand_in.dtype == np.float32 and set(stand_in.strides) == {0}
    dw = r.standard_normal((3, 3, 4)).astype(np.float32)
    want = nd.depthwise(x.astype(np.float32), dw, padding=1)
    assert bitwise_equal(nd.depthwise(xd, dw, padding=1).compute(scheduler="sync"), want)


def test_depthwise_keeps_channel_chunks():
    from numba_dsconv.cpu._simd import VEC_BYTES

    lanes = 2 * VEC_BYTES // 4  # borders at whole pairs of float32 vectors
    r = np.random.default_rng(3)
    c = 3 * lanes
    x = r.standard_normal((2, 9, 9, c)).astype(np.float32)
    dw = r.standard_normal((3, 3, c, 2)).astype(np.float32)
    bias = r.standard_normal(2 * c).astype(np.float32)
    xd = da.from_array(x, chunks=(1, 4, 5, (lanes, 2 * lanes)))
    lazy = nd.depthwise(xd, dw, bias=bias, padding="same")
    assert lazy.chunks[3] == (2 * lanes, 4 * lanes)  # channel chunk c -> c*M
    assert bitwise_equal(lazy.compute(scheduler="sync"), nd.depthwise(x, dw, bias=bias,
                                                                       padding="same"))  # fmt: skip


# --------------------------------------------------------------------------------------------
# threads inside a task


def _task_threads(scheduler, client=None):
    probe = da.zeros((2,), chunks=1).map_blocks(_dask.threads_in_a_task, dtype=np.int64)
    if client is not None:
        return set(client.compute(probe).result().tolist())
    return set(probe.compute(scheduler=scheduler).tolist())


def test_each_task_uses_its_share_of_cores(client, monkeypatch):
    import numba

    cores = len(__import__("os").sched_getaffinity(0))
    # synchronous: the calling thread's own count; threaded: cores / pool threads
    assert _task_threads("sync") == {numba.get_num_threads()}
    with dask.config.set(num_workers=cores):
        assert _task_threads("threads") == {1}
    with dask.config.set(num_workers=1):  # one dask thread: it may use every core
        assert _task_threads("threads") == {min(cores, numba.config.NUMBA_NUM_THREADS)}
    with dask.config.set(num_workers=cores):  # the multiprocessing scheduler too
        assert _task_threads("processes") == {1}
    # distributed: cores / dask threads of all workers on this host (2 workers x 1 thread)
    assert _task_threads(None, client) == {max(1, cores // 2)}
    # the override
    monkeypatch.setattr(_config, "DASK_TASK_THREADS", 1)
    assert _task_threads("sync") == {1}


def test_override_reaches_workers_through_the_environment(tmp_path):
    """NUMBA_DSCONV_DASK_THREADS in a worker's environment sets its tasks' thread count."""
    script = tmp_path / "env.py"
    script.write_text(
        textwrap.dedent("""
        import dask.array as da, distributed, numpy as np
        from numba_dsconv import _dask
        if __name__ == "__main__":
            # one single-threaded worker: on its own it would take every core
            with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                          dashboard_address=":0") as cluster:
                with distributed.Client(cluster) as client:
                    probe = da.zeros((4,), chunks=1).map_blocks(_dask.threads_in_a_task,
                                                                dtype=np.int64)
                    print(sorted(set(client.compute(probe).result().tolist())))
    """)
    )
    env = {**__import__("os").environ, "NUMBA_DSCONV_DASK_THREADS": "1"}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=300, env=env, cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip().endswith("[1]"), out.stdout + out.stderr


# --------------------------------------------------------------------------------------------
# an image larger than the workers' memory


def test_out_of_core_image_through_two_workers():
    """A lazily generated image of 4.3 GB (float32), a separable layer at stride 2 through two
    workers limited to 1.5 GB each: the whole result streams through (a reduction), and crops
    that straddle chunk borders equal the in-memory call on the same input crop."""
    side, c, chunk = 16384, 4, 2048
    with (
        distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                 memory_limit="1.5GB", dashboard_address=":0") as cluster,
        distributed.Client(cluster) as client,
    ):  # fmt: skip
        rs = da.random.RandomState(7)
        x = rs.standard_normal((1, side, side, c), chunks=(1, chunk, chunk, c)).astype(np.float32)
        assert x.nbytes > 2 * 1.5e9 * 1.4
        r = np.random.default_rng(8)
        dw, pw = r.standard_normal((3, 3, c)).astype(np.float32), r.standard_normal((c, 8))
        pw = pw.astype(np.float32)
        y = nd.separable(x, dw, pw, stride=2, padding="same", mid_activation="relu6")
        assert y.shape == (1, side // 2, side // 2, 8)
        total = client.compute(y.sum(dtype=np.float64)).result()
        assert np.isfinite(total)
        # 'same' at stride 2 on an even side: pad 0 before, 1 after; output o reads 2o..2o+2
        for r0, c0 in ((chunk // 2 - 3, chunk // 2 - 2), (side // 2 - 5, 3 * chunk // 2 - 4)):
            crop = y[:, r0 : r0 + 7, c0 : c0 + 6]
            rows, cols = crop.shape[1:3]  # 5 rows at the bottom border
            x_crop = x[:, 2 * r0 : 2 * (r0 + rows) + 1, 2 * c0 : 2 * (c0 + cols) + 1]
            x_crop = client.compute(x_crop).result()
            missing = 2 * rows + 1 - x_crop.shape[1]  # the image's own padding row, if reached
            x_crop = np.pad(x_crop, ((0, 0), (0, missing), (0, 0), (0, 0)))
            want = nd.separable(x_crop, dw, pw, stride=2, mid_activation="relu6")
            assert want.shape == crop.shape
            assert bitwise_equal(client.compute(crop).result(), want)


# --------------------------------------------------------------------------------------------
# the workqueue threading layer under the threaded scheduler, bad inputs


def test_workqueue_threaded_scheduler_does_not_abort(tmp_path):
    script = tmp_path / "wq.py"
    script.write_text(
        textwrap.dedent("""
        import dask, dask.array as da, numba, numpy as np, numba_dsconv as nd
        r = np.random.default_rng(0)
        x = r.standard_normal((8, 48, 48, 32)).astype(np.float32)
        dw, pw = r.standard_normal((3, 3, 32)), r.standard_normal((32, 64))
        want = nd.separable(x, dw, pw, padding="same")
        lazy = nd.separable(da.from_array(x, chunks=(1, 24, 48, 32)), dw, pw, padding="same")
        with dask.config.set(num_workers=4):
            for _ in range(3):
                assert lazy.compute(scheduler="threads").tobytes() == want.tobytes()
        print(numba.threading_layer(), "OK")
    """)
    )
    env = {**__import__("os").environ, "NUMBA_THREADING_LAYER": "workqueue"}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=300, env=env, cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0 and "workqueue OK" in out.stdout, out.stdout + out.stderr


def test_bad_dask_inputs():
    r = np.random.default_rng(4)
    x = r.standard_normal((2, 8, 8, 4)).astype(np.float32)
    dw, pw = r.standard_normal((3, 3, 4)), r.standard_normal((4, 3))
    xd = da.from_array(x, chunks=(1, 4, 4, 4))
    with pytest.raises(TypeError, match="dw is a dask array; only x may be one"):
        nd.separable(xd, da.from_array(dw), pw)
    with pytest.raises(TypeError, match="bias is a dask array"):
        nd.pointwise(xd, pw, bias=da.zeros(3))
    with pytest.raises(TypeError, match="pw is a dask array"):
        nd.pointwise(x, da.from_array(pw))  # a dask weight is never computed silently
    with pytest.raises(TypeError, match="out= cannot be used when x is a dask array"):
        nd.depthwise(xd, dw, out=np.empty((2, 6, 6, 4)))
    unknown = xd[xd[:, 0, 0, 0] > 0]
    with pytest.raises(ValueError, match="unknown chunk sizes"):
        nd.depthwise(unknown, dw)
    with pytest.raises(TypeError, match="x must be float32 or float64"):
        nd.depthwise(xd.astype(np.int32), dw)
    with pytest.raises(ValueError, match="x has 4 channels"):
        nd.depthwise(xd, dw[..., :3])
    with pytest.raises(ValueError, match="x must be 4-D"):
        nd.depthwise(xd[0, 0], dw)
    with pytest.raises(TypeError, match="numba_dsconv takes NumPy or CuPy chunks"):
        nd.depthwise(da.ma.masked_greater(xd, 0), dw)  # a mask would be ignored
    with pytest.warns(RuntimeWarning, match="NUMBA_DSCONV_DASK_THREADS"):
        assert _config._dask_task_threads("auto") == 0
    with pytest.raises(ValueError, match="n must be None or an int >= 1"):
        nd.set_dask_threads(0)
    bag = pytest.importorskip("dask.bag")
    with pytest.raises(TypeError, match="x must be an array; got a Bag"):
        nd.depthwise(bag.from_sequence([1, 2]), dw)


# --------------------------------------------------------------------------------------------
# the scale-out benchmark's flow (small sizes: nothing here is about speed)


def test_bench_dask_flow(tmp_path, capsys):
    import json

    from numba_dsconv import cli

    out = tmp_path / "dask.json"
    assert cli.main(["bench", "--dask", "--quick", "--repeat", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert {(r["workload"].split(":")[0], r["workers"]) for r in rows} == {
        ("batch", 1),
        ("batch", 2),
        ("image", 1),
        ("image", 2),
    }
    for r in rows:
        assert r["dask_s"] > 0 and r["memory_s"] > 0 and r["tasks"] >= 1
        assert (r["speedup"] is None) == (r["workers"] == 1)
    # tasks: one per output block plus one per weight (batch of 8, one image per chunk)
    one_image = [r for r in rows if r["workload"].startswith("batch") and r["chunk"] == "1"]
    assert all(r["tasks"] == 8 + 2 for r in one_image)
    assert set(data["guidance"]) == {r["workload"] for r in rows}
    assert "speedup" in capsys.readouterr().out
