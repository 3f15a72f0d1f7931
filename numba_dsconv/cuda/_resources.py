"""What ``ptxas`` says a kernel build needs: registers, shared memory, stack, spills.

Used by ``benchmarks/cuda_resources.py`` and the PTX tests; needs no GPU, only ``ptxas`` (from
the ``nvidia-cuda-nvcc`` wheel that the ``cuda12`` extra brings, or a CUDA toolkit).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile


def find_ptxas() -> str | None:
    """The toolkit wheel's ptxas in this environment, else one on PATH or in /usr/local/cuda*."""
    for pattern in (
        os.path.join(sys.prefix, "lib", "python*", "site-packages", "nvidia", "*", "bin", "ptxas"),
        "/usr/local/cuda*/bin/ptxas",
    ):
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[-1]
    return shutil.which("ptxas")


def assemble(ptx: str, ptxas: str, arch: str = "sm_90") -> dict[str, int]:
    """``ptxas -v`` of one PTX module: {'registers', 'shared', 'stack', 'spill_stores',
    'spill_loads'} in registers / bytes. Raises RuntimeError when ptxas fails."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        proc = subprocess.run(
            [ptxas, f"-arch={arch}", "-v", src, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True,
            text=True,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed: {proc.stderr.strip()[:500]}")
    text = proc.stderr

    def grab(pattern: str, group: int = 1) -> int:
        m = re.search(pattern, text)
        return int(m.group(group)) if m else 0

    return {
        "registers": grab(r"Used (\d+) registers"),
        "shared": grab(r"(\d+) bytes smem"),
        "stack": grab(r"(\d+) bytes stack frame"),
        "spill_stores": grab(r"(\d+) bytes spill stores"),
        "spill_loads": grab(r"(\d+) bytes spill loads"),
    }


def blocks_per_sm(registers: int, shared: int, threads: int) -> int:
    """Resident blocks per multiprocessor on sm_90 (H100/H200) by the CUDA occupancy rules:
    64K registers allocated per warp in units of 256, 228 KB shared memory (1 KB reserved per
    block), 2048 threads, 32 blocks. A calculation, not a measurement."""
    warps = -(-threads // 32)
    per_warp = -(-registers * 32 // 256) * 256
    by_regs = 65536 // (per_warp * warps) if registers else 32
    by_shared = (228 * 1024) // (shared + 1024)
    return max(0, min(by_regs, by_shared, 2048 // threads, 32))
