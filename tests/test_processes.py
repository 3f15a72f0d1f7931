"""Processes: fork, spawn and forkserver children (multiprocessing pools, a bare os.fork, torch
DataLoader workers), each after a parent that has run nothing, only serial-sized calls, and
parallel ones. Under GNU OpenMP a forked child of a parent that started the thread pool used to
be killed ("fork() called from a process already using GNU OpenMP") and Pool.map hung; now such
a child runs the serial kernels. Every child's result must equal the parent's bit for bit.

Each scenario runs in a subprocess with a timeout (a hang fails the test instead of the run).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TIMEOUT = 600

COMMON = '''
import os
import sys

import numpy as np

import numba_dsconv as nd
from numba_dsconv import _config
from numba.np.ufunc import parallel as numba_parallel


def job(seed):
    """Every op, parallel-sized (the pool) and serial-sized; and whether we ran serial-only."""
    r = np.random.default_rng(seed)
    x = r.standard_normal((2, 40, 40, 32)).astype(np.float32)
    dw = r.standard_normal((3, 3, 32)).astype(np.float32)
    pw = r.standard_normal((32, 64)).astype(np.float32)
    w = r.standard_normal((3, 3, 32, 8)).astype(np.float32)
    small = x[:1, :6, :6, :8]
    outs = [
        nd.separable(x, dw, pw, padding="same", mid_activation="relu6"),
        nd.depthwise(x, dw, stride=2, padding="same", layout="NHWC"),
        nd.pointwise(x.transpose(0, 3, 1, 2), pw, layout="NCHW"),
        nd.conv2d(x, w, padding=1),
        nd.separable(small, dw[..., :8], pw[:8]),
    ]
    return [o.tobytes() for o in outs], _config.SERIAL_ONLY


def serial_calls_only():
    """Serial-sized calls of every op must not start Numba's thread pool."""
    r = np.random.default_rng(9)
    x = r.standard_normal((1, 6, 6, 8)).astype(np.float32)
    nd.depthwise(x, np.ones((3, 3, 8), np.float32))
    nd.pointwise(x, np.ones((8, 4), np.float32))
    nd.separable(x, np.ones((3, 3, 8), np.float32), np.ones((8, 4), np.float32))
    nd.conv2d(x, np.ones((3, 3, 8, 4), np.float32), layout="NHWC")
    xc = np.ascontiguousarray(x.transpose(0, 3, 1, 2))  # NCHW: the layout transposes too
    nd.separable(xc, np.ones((3, 3, 8), np.float32), np.ones((8, 2), np.float32), layout="NCHW")
    assert not numba_parallel._is_initialized, "a serial call started the thread pool"


def compare(children, parent, what):
    for seed, (got, serial_only) in enumerate(children):
        assert got == parent[seed], f"{what}: child result for seed {seed} differs"
'''

POOLS = (
    COMMON
    + """

def main(method):
    import multiprocessing as mp

    ctx = mp.get_context(method)
    runs = {}
    for state in ("fresh", "serial", "parallel"):
        if state == "serial":
            serial_calls_only()
        if state == "parallel":
            job(2)
            assert numba_parallel._is_initialized
        with ctx.Pool(2) as pool:
            runs[state] = pool.map_async(job, [0, 1]).get(timeout=240)
    if method == "fork":  # a bare fork too, after the pool has run
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            got, _ = job(0)
            os.write(write, b"".join(got))
            os._exit(0)
        os.close(write)
        data = b""
        while chunk := os.read(read, 1 << 20):
            data += chunk
        _, status = os.waitpid(pid, 0)
        assert status == 0, f"the forked child died with status {status}"
        runs["os.fork"] = [([data], None)]
    parent = [job(0)[0], job(1)[0]]
    for state, children in runs.items():
        if state == "os.fork":
            assert children[0][0][0] == b"".join(parent[0]), "os.fork child differs"
        else:
            compare(children, parent, f"{method} after {state} parent")
    flags = {state: [c[1] for c in runs[state]] for state in ("fresh", "serial", "parallel")}
    import numba
    from numba.np.ufunc import omppool

    gnu = numba.threading_layer() == "omp" and omppool.openmp_vendor == "GNU"
    print("pool survives fork:", not gnu)
    print("serial-only children:", flags)
    print("OK")


if __name__ == "__main__":
    main(sys.argv[1])
"""
)

DATALOADER = (
    COMMON
    + """
import torch


class Layers(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.frombuffer(bytearray(b"".join(job(i % 2)[0])), dtype=torch.uint8)


if __name__ == "__main__":
    # the parent has trained a step (torch's GNU OpenMP pool started) and, in "both", has run
    # our parallel kernels too
    a = torch.randn(256, 256, requires_grad=True)
    conv = torch.nn.functional.conv2d(a.reshape(1, 1, 256, 256), torch.randn(4, 1, 3, 3))
    (torch.relu(a @ a).sum() + conv.sum()).backward()
    if sys.argv[1] == "both":
        job(2)
    loader = torch.utils.data.DataLoader(Layers(), batch_size=None, num_workers=2, timeout=240)
    got = [bytes(t.numpy()) for t in loader]
    parent = [b"".join(job(i % 2)[0]) for i in range(4)]
    assert got == parent, "a DataLoader worker's result differs from the parent's"
    print("OK")
"""
)


def _run(tmp_path: Path, name: str, source: str, *args: str) -> str:
    script = tmp_path / name
    script.write_text(textwrap.dedent(source))
    proc = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=tmp_path,
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_pools_after_fresh_serial_and_parallel_parents(method, tmp_path):
    out = _run(tmp_path, "pools.py", POOLS, method)
    assert "'fresh': [False, False]" in out, out  # nothing to protect: parallel children
    assert "'serial': [False, False]" in out, out  # serial calls started no pool
    if method == "fork" and "pool survives fork: False" in out:  # GNU OpenMP
        assert "'parallel': [True, True]" in out, out  # forked after the pool: serial kernels


@pytest.mark.parametrize("parent", ["torch", "both"])
def test_dataloader_workers_after_a_training_step(parent, tmp_path):
    """torch's own GNU OpenMP pool in the parent (a training step) must not hang our kernels
    in forked DataLoader workers, with or without our pool started too."""
    pytest.importorskip("torch")
    _run(tmp_path, "loader.py", DATALOADER, parent)


FORK_WHILE_BUSY = (
    COMMON
    + """
import threading
import time

if __name__ == "__main__":
    stop = threading.Event()

    def busy():
        while not stop.is_set():
            job(3)

    t = threading.Thread(target=busy)
    t.start()
    time.sleep(0.5)
    want = job(0)[0]
    pids = []
    for _ in range(5):  # forked while the other thread is inside (or between) parallel calls
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            from numba_dsconv.cpu.backend import threading_layer

            threading_layer()  # what `numba-dsconv info` asks; must not launch a dead pool
            os.write(write, b"ok" if job(0)[0] == want else b"differs")
            os._exit(0)
        os.close(write)
        pids.append((pid, read))
        time.sleep(0.05)
    stop.set()
    t.join()
    for pid, read in pids:
        deadline = time.time() + 120
        while time.time() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, 9)
            raise SystemExit("a child forked during a parallel call hung")
        assert status == 0 and os.read(read, 16) == b"ok", status
    print("OK")
"""
)


@pytest.mark.parametrize("layer", ["default", "workqueue"])
def test_fork_while_another_thread_is_in_a_parallel_call(layer, tmp_path, monkeypatch):
    """A lock (workqueue's launch guard) or a pool held by another thread at fork time must
    not hang or kill the child."""
    if layer == "workqueue":
        monkeypatch.setenv("NUMBA_THREADING_LAYER", "workqueue")
    _run(tmp_path, "busy.py", FORK_WHILE_BUSY)
