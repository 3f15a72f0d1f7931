"""The on-disk kernel cache: reused while nothing changed, invalidated by an edit to any kernel
source file (not only the kernel's own file, which is all Numba checks by itself)."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numba_dsconv
from numba_dsconv.cpu import _jit

PACKAGE = Path(numba_dsconv.__file__).resolve().parent

# conv2d_nhwc (cpu/conv2d.py) applies its activation with ``vact`` of cpu/_simd.py (in the GEMM
# micro-kernel's epilogue): relu6 of a large output is 6 until vact is edited to clip at 5.
PROBE = """
import json
import numpy as np
import numba_dsconv
from numba_dsconv import conv2d
from numba_dsconv.cpu.conv2d import CONV2D
y = conv2d(np.ones((1, 3, 3, 2)), np.ones((3, 3, 2, 2)), activation="relu6")
hits = sum(CONV2D.serial.stats.cache_hits.values())
print(json.dumps({"max": float(y.max()), "hits": hits, "file": numba_dsconv.__file__}))
"""


def _run(root: Path, cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_DSCONV_NO_CACHE"}
    env.update(PYTHONPATH=str(root), NUMBA_CACHE_DIR=str(cache))
    proc = subprocess.run(
        [sys.executable, "-c", PROBE],
        env=env,
        cwd=root,  # `python -c` puts the working directory first on sys.path
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(got.pop("file")).resolve().parent == (root / "numba_dsconv").resolve()
    return got


def test_editing_a_helper_in_another_file_recompiles_its_callers(tmp_path):
    root = tmp_path / "src"
    shutil.copytree(PACKAGE, root / "numba_dsconv", ignore=shutil.ignore_patterns("__pycache__"))
    cache = tmp_path / "cache"
    first = _run(root, cache)
    assert first == {"max": 6.0, "hits": 0}
    second = _run(root, cache)
    assert second == {"max": 6.0, "hits": 1}  # nothing changed: the compiled kernel is reused
    helper = root / "numba_dsconv" / "cpu" / "_simd.py"  # vact, in conv2d's GEMM epilogue
    text = helper.read_text()
    edited = text.replace(
        "six = ir.Constant(vty, [6.0] * v.lanes)", "six = ir.Constant(vty, [5.0] * v.lanes)"
    )
    assert edited != text, "the probe's helper changed shape: update the edit"
    helper.write_text(edited)
    third = _run(root, cache)
    assert third == {"max": 5.0, "hits": 0}  # recompiled from the edited helper
    # an index that cannot be read back (a type of another version, a truncated file) is a
    # cache miss, not a crash
    for index in cache.rglob("*.nbi"):
        data = index.read_bytes()
        index.write_bytes(data[: len(data) // 2])
    fourth = _run(root, cache)
    assert fourth == {"max": 5.0, "hits": 0}
    assert _run(root, cache) == {"max": 5.0, "hits": 1}  # and the rewritten index is used


def _package_imports(path: Path) -> set[Path]:
    """The numba_dsconv source files a module of the cpu package imports (relative imports,
    and absolute ones of numba_dsconv)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names = [node.module]
        for name in names:
            if name.split(".")[0] == "numba_dsconv":
                target = PACKAGE.parent.joinpath(*name.split("."))
                py = target.with_suffix(".py")
                found.add(py if py.exists() else target / "__init__.py")
        if isinstance(node, ast.ImportFrom) and node.level:
            base = path.parent
            for _ in range(node.level - 1):
                base = base.parent
            parts = node.module.split(".") if node.module else []
            target = base.joinpath(*parts)
            if node.module is None:  # from .. import _config
                found |= {base / f"{alias.name}.py" for alias in node.names}
            elif target.with_suffix(".py").exists():
                found.add(target.with_suffix(".py"))
            else:
                found.add(target / "__init__.py")
    return found


def test_the_stamp_covers_every_source_the_kernels_import():
    sources = {p.resolve() for p in _jit.KERNEL_SOURCES}
    modules = list((PACKAGE / "cpu").glob("*.py"))
    assert len(modules) >= 9  # the glob found the package
    for module in modules:
        for imported in _package_imports(module):
            assert imported.resolve() in sources, f"{module.name} imports {imported}"


def _linked_names(library, seen=None) -> Iterator[str]:
    """The names of every library linked into ``library``, recursively."""
    seen = set() if seen is None else seen
    for sub in getattr(library, "_linking_libraries", ()):
        if id(sub) not in seen:
            seen.add(id(sub))
            yield sub.name
            yield from _linked_names(sub, seen)


def test_the_gemm_register_blocks_have_no_code_of_their_own():
    """A helper's own compiled code is what a call to it binds to in a process that compiled
    the kernels (``_jit.inlined``): the register blocks compiled alone spilled their
    accumulators, and the first process's GEMMs ran at 35-40 % of the FMA peak. Inlined in
    Numba's IR they are no library of their own; the other helpers ``gemm_wide`` and
    ``gemm_narrow`` call (here ``prefetch_share``) are; likewise conv2d's ``conv_wide`` and the
    wide and tap blocks' pieces. Each compiled afresh here, uncached."""
    import numba
    import numpy as np

    from numba_dsconv.cpu import conv2d, pointwise

    x = np.ones((12, 16), np.float32)
    w = np.ones((16, 64), np.float32)
    bias = np.zeros(64, np.float32)
    nopack = pointwise.no_packed(np.dtype(np.float32))
    for name in ("gemm_wide", "gemm_narrow"):
        fresh = numba.njit(**_jit._JIT_OPTS)(getattr(pointwise, name).py_func)
        out = np.empty((12, 64), np.float32)
        pk, at, part = pointwise.gemm_scratch(16, 12, out)
        scratch = (pk, at) if name == "gemm_wide" else (pk, at, part)
        fresh(x, False, 12, w, nopack, bias, out, 0, 64, 0, False, *scratch, 0, 0, False)
        assert (out == 16).all()
        (sig,) = fresh.signatures
        names = {n.split(".")[0] for n in _linked_names(fresh.overloads[sig].library)}
        assert "prefetch_share" in names, names
        assert not names & _REGISTER_BLOCKS, names
    # conv2d's direct path: its block's pieces inlined the same way
    xc = np.ones((1, 4, 4, 3), np.float32)
    band, offs, sm, sq = conv2d.conv_band(xc, 0, 16, 4, 4, (3, 3, 1, 1, 1, 1, 1, 1, 0), xc)
    fresh = numba.njit(**_jit._JIT_OPTS)(conv2d.conv_wide.py_func)
    out = np.empty((16, 88), np.float32)  # a pair of panels, then a panel cut by C_out
    pk, _, _ = pointwise.gemm_scratch(54, 16, out)
    fresh(band, offs, sm, sq, 3, 3, np.ones((27, 88), np.float32), nopack,
          np.zeros(96, np.float32), out, 0, 88, 0, pk, 0, 0)  # fmt: skip
    inside = np.array([2, 3, 3, 2])  # the in-image taps of each row / column, 3 channels each
    np.testing.assert_array_equal(out, np.repeat(3 * np.outer(inside, inside).ravel(), 88)
                                  .reshape(16, 88))  # fmt: skip
    (sig,) = fresh.signatures
    names = {n.split(".")[0] for n in _linked_names(fresh.overloads[sig].library)}
    assert "prefetch_share" in names, names
    assert not names & _REGISTER_BLOCKS, names


_REGISTER_BLOCKS = {"gemm_block_wide", "gemm_block", "wide_start", "wide_step", "wide_steps",
                    "wide_finish", "tap_start", "tap_steps", "tap_finish", "band_rows"}  # fmt: skip
