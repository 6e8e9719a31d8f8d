"""The README's main job, end to end, as a user runs it: ``python examples/main_job.py``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import kill_all, processes_marked

MAIN_JOB = Path(__file__).resolve().parents[1] / "examples" / "main_job.py"
MARK = "TETHER_TEST_MAIN_JOB"


@pytest.mark.timeout(180)
def test_main_job_runs_end_to_end(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("TETHER_SERVICE_URL", "TETHER_TOKEN", "TETHER_HOME")}
    env["HOME"] = str(tmp_path)  # nothing from the developer's ~/.tether
    env[MARK] = str(tmp_path)  # what the main job starts (detached service and endpoint too) carries it
    try:
        proc = subprocess.run([sys.executable, str(MAIN_JOB)], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=170)
    except subprocess.TimeoutExpired as exc:
        kill_all(processes_marked(MARK, lambda value: value == str(tmp_path)))  # nothing left running
        pytest.fail(f"the main job did not end within 170 s:\n{exc.stdout}\n{exc.stderr}")
    out = proc.stdout
    assert proc.returncode == 0, f"main job failed ({proc.returncode}):\n{out}\n{proc.stderr}"
    # the core Executor demo
    assert "pow(2, 10)           = 1024" in out
    assert "map(str.upper)       = ['A', 'B', 'C']" in out
    pi = float(re.search(r"pi \(8 tasks\)\s+= ([0-9.]+)", out).group(1))
    assert abs(pi - 3.1416) < 0.05
    assert "shell command        = exit 0, stdout ['hello', 'from'," in out
    assert "log(-1) raised       = ValueError: math domain error" in out
    assert re.search(r"went through: received, .*running, failed", out)
    assert "2000 small tasks     = sum 1999000" in out
    # the Parsl workflow through tether.parsl.TetherExecutor
    assert "parsl add chain      = 10" in out
    assert re.search(r"parsl python_app ran = pid \d+ on .*, Tether task [0-9a-f-]{36}", out)
    assert re.search(r"parsl bash_app       = 'hello parsl from .+' \(stdout file task_\d+_greet.stdout\)", out)
    assert "parsl MPI bash_app   = 2 ranks: ['0 2', '1 2']" in out or (
        "parsl MPI bash_app   = skipped" in out and not os.environ.get("CI")), out
    # the Dask computation through tether.dask.TetherCluster
    assert "500 futures          = sum " in out and re.search(r"tasks run            = [1-9]\d* on the endpoint", out)
    # the Snakemake workflow through --executor tether
    assert re.search(r"snakemake workflow   = 9 jobs in [0-9.]+s; \d+ samples counted", out)
    assert out.rstrip().endswith("service and endpoint stopped.")
