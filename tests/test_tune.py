"""`numba-dsconv tune`: the tuning file is written for this machine and read at import by
later processes on it, and only on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from numba_dsconv import _config, cli
from numba_dsconv.bench import tune

PROBE = (
    "import json; from numba_dsconv import _config as c; "
    "print(json.dumps({k: getattr(c, k) for k in c.TUNED}))"
)


def _import_values(path, **env) -> tuple[dict, str]:
    full = dict(os.environ, NUMBA_DSCONV_TUNING_FILE=str(path), **env)
    if "NUMBA_DSCONV_NO_TUNING" not in env:
        full.pop("NUMBA_DSCONV_NO_TUNING", None)
    proc = subprocess.run(
        [sys.executable, "-c", PROBE], env=full, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def _write(path, machine, values) -> None:
    path.write_text(json.dumps({"machine": machine, "values": values}))


VALUES = {"CPU_TILE_BYTES": 123456, "CPU_TILE_MAX_PIXELS": 96, "CPU_GEMM_KC": 112}


def test_a_tuning_file_for_this_machine_is_used(tmp_path):
    path = tmp_path / "tuning.json"
    _write(path, _config.machine_key(), VALUES)
    got, _ = _import_values(path)
    assert got == VALUES
    # ... unless switched off
    got, _ = _import_values(path, NUMBA_DSCONV_NO_TUNING="1")
    assert got == tune.defaults()


def test_a_tuning_file_made_around_other_defaults_is_ignored_with_a_warning(tmp_path):
    """A file `numba-dsconv tune` wrote under an older rule for the defaults (the reduction
    block from L1, 256) would pin the old values: it is ignored, with a warning, until the
    machine is tuned again; one made around today's defaults is used."""
    path = tmp_path / "tuning.json"
    old = {**tune.defaults(), "CPU_GEMM_KC": 256}
    path.write_text(json.dumps({"machine": _config.machine_key(), "values": old,
                                "defaults": {**old, "CPU_GEMM_KC": 255}}))  # fmt: skip
    got, err = _import_values(path)
    assert got == tune.defaults()
    assert "tuned around other default blocking" in err and "tune` again" in err
    path.write_text(json.dumps({"machine": _config.machine_key(), "values": VALUES,
                                "defaults": tune.defaults()}))  # fmt: skip
    got, err = _import_values(path)
    assert got == VALUES and "Warning" not in err


def test_a_tuning_file_of_another_machine_is_ignored(tmp_path):
    path = tmp_path / "tuning.json"
    _write(path, {**_config.machine_key(), "cpu": "another CPU"}, VALUES)
    got, err = _import_values(path)
    assert got == tune.defaults() and "Warning" not in err


@pytest.mark.parametrize("text", ["{not json", '{"machine": {}, "values": {"CPU_GEMM_KC": 0}}'])
def test_a_broken_tuning_file_is_ignored_with_a_warning(tmp_path, text):
    path = tmp_path / "tuning.json"
    path.write_text(text)
    got, err = _import_values(path)
    assert got == tune.defaults()
    assert "ignoring the tuning file" in err


def test_defaults_follow_the_caches():
    d = tune.defaults()
    assert d["CPU_TILE_BYTES"] == _config.L2_BYTES // 2
    assert d["CPU_GEMM_KC"] % 16 == 0 and 64 <= d["CPU_GEMM_KC"] <= 4096
    assert d["CPU_GEMM_KC"] * 128 <= _config.L2_BYTES // 4  # the panel in a quarter of L2


def test_tune_writes_a_file_this_machine_reads(tmp_path, monkeypatch):
    path = tmp_path / "t" / "tuning.json"
    monkeypatch.setenv("NUMBA_DSCONV_TUNING_FILE", str(path))
    before = {k: getattr(_config, k) for k in _config.TUNED}
    result = tune.tune([9], [1], rounds=1, budget_s=0.002)
    assert {k: getattr(_config, k) for k in _config.TUNED} == before  # this process untouched
    assert result.path == str(path)
    data = json.loads(path.read_text())
    assert data["machine"] == _config.machine_key()
    assert data["values"] == result.chosen
    tried = [t["values"] for t in data["trials"]]
    assert result.chosen in tried or result.chosen == result.defaults
    assert result.score <= 1.0
    got, _ = _import_values(path)
    assert got == result.chosen


def test_tune_command_dry_run_and_reset(tmp_path, monkeypatch, capsys):
    path = tmp_path / "tuning.json"
    monkeypatch.setenv("NUMBA_DSCONV_TUNING_FILE", str(path))
    assert cli.main(["tune", "--layers", "9", "--batches", "1", "--rounds", "1", "--dry-run"]) == 0
    assert not path.exists()
    assert "chosen:" in capsys.readouterr().out
    _write(path, _config.machine_key(), VALUES)
    assert cli.main(["tune", "--reset"]) == 0
    assert not path.exists()
    assert cli.main(["tune", "--batches", "0"]) != 0
