"""Scale-out on dask.distributed: strong scaling and per-task overhead (``bench --dask``).

Two workloads, each against the in-memory call on the same number of cores, in the same run:
a batch (suite layer 3, N=64, chunked by images) and one large image (a separable 3x3 layer,
chunked in square tiles). For 1 and 2 worker processes of one thread each (each task then runs
Numba on one core: ``set_dask_threads(1)`` on every worker), and for each chunk size:

- ``dask_s``: median wall time of building the graph, computing it and holding the result on
  the workers (``client.persist`` + ``wait``; the input was persisted there before timing);
- ``memory_s``: the in-memory call, Numba on as many threads as there are workers;
- ``overhead = dask_s / memory_s - 1`` and the cost per task, (dask_s - memory_s) x workers /
  tasks: core-seconds a task adds, everything included (building the graph on the client,
  scheduling, the halo copies); on one worker the scheduler and client have the spare core,
  which the in-memory baseline (one thread) does not use;
- strong scaling at each chunk: speedup = dask_s(1 worker) / dask_s(2 workers), efficiency =
  speedup / 2.

``guidance`` names, per workload, the smallest chunk whose overhead on 2 workers is under 10 %.
"""

from __future__ import annotations

import statistics
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .machine import machine_info
from .suite import layer as suite_layer


@dataclass
class ScaleRow:
    workload: str
    workers: int
    chunk: str  # images per chunk, or tile side in pixels
    chunk_mb: float  # input megabytes per chunk
    tasks: int  # tasks in the graph of one call
    dask_s: float
    memory_s: float
    overhead: float
    task_overhead_us: float
    speedup: float | None = None  # vs 1 worker, same chunk
    efficiency: float | None = None


@dataclass
class ScaleResult:
    rows: list[ScaleRow]
    guidance: dict[str, str]
    machine: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def json_ready(self) -> dict[str, Any]:
        return {"rows": [asdict(r) for r in self.rows], "guidance": self.guidance,
                "machine": self.machine, "settings": self.settings}  # fmt: skip


def _workloads(quick: bool) -> list[dict[str, Any]]:
    lay = suite_layer(3)
    n = 8 if quick else 64
    x, dw, pw = lay.arrays(n)
    side, c_in, c_out = (256, 8, 16) if quick else (4096, 32, 64)
    r = np.random.default_rng(11)
    image = r.standard_normal((1, side, side, c_in), dtype=np.float32)
    dwi = r.standard_normal((3, 3, c_in), dtype=np.float32)
    pwi = (r.standard_normal((c_in, c_out), dtype=np.float32) / np.sqrt(c_in)).astype(np.float32)
    batch_chunks = [1, 2, 4, 8] if quick else [1, 2, 4, 8, 16, 32, 64]
    tiles = [64, 128, 256] if quick else [256, 512, 1024, 2048, 4096]
    return [
        {"name": f"batch: layer 3, N={n}", "x": x, "dw": dw, "pw": pw,
         "chunks": [((b, *x.shape[1:]), str(b)) for b in batch_chunks if b <= n]},
        {"name": f"image: {side}x{side}x{c_in}->{c_out}", "x": image, "dw": dwi, "pw": pwi,
         "chunks": [((1, t, t, c_in), f"{t}x{t}") for t in tiles if t <= side]},
    ]  # fmt: skip


def _median_time(
    fn: Callable[[Any], Any], repeat: int, setup: Callable[[int], Any] = lambda i: None
) -> float:
    """Median seconds of ``fn(setup(i))`` after one warm-up call (compiles or loads the
    kernels, opens the connections); ``setup`` is not timed. Each call's input and result
    are released before the next setup (a held result would crowd the workers' memory)."""
    times = []
    for i in range(repeat + 1):
        state = setup(i)
        t0 = time.perf_counter()
        out = fn(state)
        if i:
            times.append(time.perf_counter() - t0)
        del state, out
        time.sleep(0.1)  # the release reaches the workers
    return statistics.median(times)


def _alias(block: np.ndarray) -> np.ndarray:
    return block


def _warm_up(cases: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
    """Run each case serial- and parallel-sized (both builds of the kernel) in this process."""
    from .. import _config, api

    for x, dw, pw in cases:
        api.separable(x[:, :4, :4], dw, pw, padding=1)
        saved = _config.SERIAL_MAX_MACS
        _config.SERIAL_MAX_MACS = 0
        try:
            api.separable(x, dw, pw, padding=1)
        finally:
            _config.SERIAL_MAX_MACS = saved


def run_dask_bench(
    *, repeat: int = 5, quick: bool = False, progress: Callable[[str], None] | None = None
) -> ScaleResult:
    """Measure both workloads on 1 and 2 single-threaded worker processes (see module doc)."""
    import dask.array as da
    import distributed
    import numba

    from .. import api
    from .._dask import set_dask_threads

    say = progress or (lambda _msg: None)
    loads = _workloads(quick)
    memory: dict[tuple[str, int], float] = {}
    previous = numba.get_num_threads()
    try:
        for w in (1, 2):
            numba.set_num_threads(min(w, numba.config.NUMBA_NUM_THREADS))
            for load in loads:
                say(f"in memory, {w} thread(s): {load['name']}")
                memory[(load["name"], w)] = _median_time(
                    lambda _, ld=load: api.separable(ld["x"], ld["dw"], ld["pw"], padding=1), repeat
                )
    finally:
        numba.set_num_threads(previous)
    rows: list[ScaleRow] = []
    for w in (1, 2):
        with (
            distributed.LocalCluster(n_workers=w, threads_per_worker=1, processes=True,
                                     dashboard_address=":0") as cluster,
            distributed.Client(cluster) as client,
        ):  # fmt: skip
            client.run(set_dask_threads, 1)  # one core per task: the workers share the machine
            # every worker loads both kernel builds before anything is timed (a worker's first
            # call loads them from the disk cache: seconds, once per process)
            client.run(_warm_up, [(ld["x"][:1, :64, :64], ld["dw"], ld["pw"]) for ld in loads])
            for load in loads:
                for chunks, label in load["chunks"]:
                    say(f"{w} worker(s), {load['name']}, chunk {label}")

                    with warnings.catch_warnings():  # the input travels once, untimed
                        warnings.simplefilter("ignore", UserWarning)  # "a large graph"
                        x0 = client.persist(da.from_array(load["x"], chunks=chunks))
                    distributed.wait(x0)

                    def setup(i: int, x0: Any = x0) -> Any:
                        # the same blocks under new keys (no copy, untimed): the result's keys
                        # are new too, so nothing an earlier call computed can be reused
                        xd = client.persist(
                            x0.map_blocks(
                                _alias, name=f"x-{uuid.uuid4().hex}", dtype=x0.dtype, meta=x0._meta
                            )
                        )
                        distributed.wait(xd)
                        return xd

                    def call(xd: Any, ld: dict = load) -> Any:
                        y = client.persist(api.separable(xd, ld["dw"], ld["pw"], padding=1))
                        distributed.wait(y)
                        return y

                    xd = setup(-1)
                    graph = api.separable(xd, load["dw"], load["pw"], padding=1).__dask_graph__()
                    tasks = len(graph) - len(xd.__dask_graph__())
                    del xd, graph
                    t = _median_time(call, repeat, setup)
                    m = memory[(load["name"], w)]
                    rows.append(ScaleRow(
                        workload=load["name"], workers=w, chunk=label,
                        chunk_mb=round(float(np.prod(chunks)) * 4 / 1e6, 3), tasks=tasks,
                        dask_s=t, memory_s=m, overhead=t / m - 1,
                        task_overhead_us=(t - m) * w / max(tasks, 1) * 1e6,
                    ))  # fmt: skip
    one = {(r.workload, r.chunk): r.dask_s for r in rows if r.workers == 1}
    for r in rows:
        if r.workers == 2 and (r.workload, r.chunk) in one:
            r.speedup = one[(r.workload, r.chunk)] / r.dask_s
            r.efficiency = r.speedup / 2
    guidance = {}
    for load in loads:
        fine = [r for r in rows if r.workload == load["name"] and r.workers == 2
                and r.overhead < 0.10]  # fmt: skip
        guidance[load["name"]] = (
            f"chunks of >= {fine[0].chunk} ({fine[0].chunk_mb:g} MB of input) keep the overhead "
            f"under 10 % on 2 workers"
            if fine
            else "no chunk size measured kept the overhead under 10 % on 2 workers"
        )
    return ScaleResult(rows, guidance, machine_info("cpu"),
                       {"repeat": repeat, "quick": quick, "threads_per_task": 1})  # fmt: skip


def table(result: ScaleResult) -> tuple[list[str], list[list[str]]]:
    head = ["workload", "workers", "chunk", "MB/chunk", "tasks", "dask s", "in-memory s",
            "overhead", "us/task", "speedup", "efficiency"]  # fmt: skip
    rows = []
    for r in result.rows:
        rows.append([
            r.workload, str(r.workers), r.chunk, f"{r.chunk_mb:g}", str(r.tasks),
            f"{r.dask_s:.4f}", f"{r.memory_s:.4f}", f"{100 * r.overhead:+.0f} %",
            f"{r.task_overhead_us:.0f}",
            "" if r.speedup is None else f"{r.speedup:.2f}x",
            "" if r.efficiency is None else f"{100 * r.efficiency:.0f} %",
        ])  # fmt: skip
    return head, rows
