"""A small Snakemake workflow whose every job runs on a Tether endpoint (``--executor tether``).

The main job (examples/main_job.py) calls :func:`run` with its local stack; on its own::

    python examples/snakemake_workflow.py      # starts its own local service and endpoint

It is the same command a user types: ``snakemake --executor tether --tether-endpoint-id ID``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tether.local import LocalStack, local_stack

SNAKEFILE = '''
SAMPLES = ["alpha", "beta", "gamma", "delta"]

rule all:
    input: "summary.txt"

rule make_sample:          # a shell rule, one job per sample
    output: "samples/{sample}.txt"
    resources: runtime=5   # minutes: the endpoint kills the job past it
    shell: "for i in $(seq 1 $((RANDOM % 50 + 10))); do echo {wildcards.sample} $i; done > {output}"

rule count:                # a run: rule, in Python, on the endpoint
    input: "samples/{sample}.txt"
    output: "counts/{sample}.txt"
    run:
        import os
        lines = open(input[0]).read().splitlines()
        with open(output[0], "w") as out:
            out.write(f"{wildcards.sample} {len(lines)} {os.environ['TETHER_TASK_ID']}\\n")

rule summary:
    input: expand("counts/{sample}.txt", sample=SAMPLES)
    output: "summary.txt"
    shell: "cat {input} > {output}"
'''


def run(stack: LocalStack, jobs: int = 4) -> Path:
    """Run the workflow on ``stack``'s endpoint through the snakemake CLI; print what it made."""
    workdir = Path(tempfile.mkdtemp(prefix="tether-snakemake-"))
    (workdir / "Snakefile").write_text(SNAKEFILE)
    env = dict(os.environ, TETHER_SERVICE_URL=stack.service_url, TETHER_TOKEN=stack.token)
    cmd = [sys.executable, "-m", "snakemake", "--executor", "tether", "--tether-endpoint-id", stack.endpoint_id,
           "--jobs", str(jobs)]
    print(f"snakemake            = snakemake {' '.join(cmd[3:6])} ... --jobs {jobs}  (in {workdir})")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"the Snakemake workflow failed (exit {proc.returncode}); its output is above")
    rows = [line.split() for line in (workdir / "summary.txt").read_text().splitlines()]
    tasks = {task for _, _, task in rows}
    print(f"snakemake workflow   = 9 jobs in {elapsed:.1f}s; {len(rows)} samples counted "
          f"({', '.join(f'{s}={n}' for s, n, _ in rows)}) by {len(tasks)} remote tasks")
    return workdir


if __name__ == "__main__":
    with local_stack(engine="process", workers=2) as local:
        run(local)
