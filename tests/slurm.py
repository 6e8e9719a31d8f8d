"""The one-node Slurm the Slurm tests run on (.ci/slurm-setup.sh makes it): what is missing
when it is not there, and the htex engine config that starts pilot jobs on it."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

PARTITION = "debug"

SLURM_HTEX = f"""
engine:
  type: htex
  max_workers_per_node: 2
  heartbeat_period: 2
  provider:
    type: SlurmProvider
    partition: {PARTITION}
    nodes_per_block: 1
    init_blocks: 0
    min_blocks: 0
    max_blocks: 1
    walltime: "00:10:00"
    exclusive: false
    launcher: {{type: SrunLauncher}}
heartbeat_s: 0.5
"""


def slurm_missing() -> str | None:
    if shutil.which("sinfo") is None:
        return (
            "sinfo not found: Slurm is not installed; .ci/slurm-setup.sh installs and starts a one-node Slurm"
        )
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-p", PARTITION, "-o", "%T"], capture_output=True, text=True, timeout=20
        )
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 20 s: slurmctld is not running; run .ci/slurm-setup.sh (as root)"
    if out.returncode != 0:
        return (f"Slurm is installed but not usable (sinfo: {out.stderr.strip()}); "
                f"run .ci/slurm-setup.sh (as root)")
    states = out.stdout.split()
    if not states:
        return f"Slurm has no partition {PARTITION!r}; .ci/slurm-setup.sh configures it"
    if not any(s.rstrip("*~#") in ("idle", "mixed", "allocated", "completing") for s in states):
        return (f"no usable node in Slurm partition {PARTITION!r} (states: {', '.join(states)}); "
                f"see /var/log/slurm")
    if shutil.which("sbatch") is None or shutil.which("squeue") is None:
        return "sbatch/squeue not found: install Slurm's client tools (.ci/slurm-setup.sh does)"
    return None


def require_slurm() -> None:
    """Skip (saying what is missing) without a usable Slurm; under CI, where it must be, fail."""
    missing = slurm_missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set, so the Slurm tests must run, but: {missing}", pytrace=False)
        pytest.skip(missing)
