"""A no-op task's round trip with the endpoint's workers in a podman container, against the same
endpoint without one, measured in the same run (client → service → endpoint → worker → back).

Usage::

    python benchmarks/bench_container.py [--n 300] [--warmup 50] [--rounds 3] [--engines process,htex] [--json PATH]

For each engine, two endpoints on one service: the plain one and the same engine with
``container: {type: podman, ...}`` (the image of ``tests/container_image.py``: ``FROM scratch``
with the host's system, this Python and this checkout mounted read-only). Rounds alternate
between the two, so a noisy neighbour costs both alike; each round is ``--n`` sequential
round trips after ``--warmup`` untimed ones; the best round's p50 of each is compared.
Needs podman configured as ``.ci/podman-setup.sh`` does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from tether import Executor  # noqa: E402

from container_image import container_yaml, marker_image  # noqa: E402
from parsl_stack import engine_stack  # noqa: E402
from peers import measure_latency  # noqa: E402

ENGINES = {
    "process": "type: process\n  workers: 2",
    "htex": "type: htex\n  max_workers_per_node: 2\n  provider: "
            "{type: LocalProvider, init_blocks: 1, min_blocks: 0, max_blocks: 1}",
}


@contextlib.contextmanager
def endpoint(config: str) -> Iterator[Executor]:
    with tempfile.TemporaryDirectory(prefix="bench-container-") as tmp, \
            engine_stack(Path(tmp) / "home", config) as stack, \
            Executor(endpoint_id=stack.endpoint_id, service=stack.service_url, token=stack.token) as ex:
        yield ex


def plain_yaml(engine: str) -> str:
    return f"engine:\n  {engine}\nheartbeat_s: 0.5\n"


def compare(engine: str, image: str, n: int, warmup: int, rounds: int) -> dict:
    with endpoint(plain_yaml(ENGINES[engine])) as plain, endpoint(container_yaml(image, ENGINES[engine])) as boxed:
        runs: dict[str, list[dict]] = {"host": [], "podman": []}
        for r in range(rounds):
            order = [("host", plain), ("podman", boxed)]
            for name, ex in order if r % 2 == 0 else order[::-1]:
                runs[name].append(measure_latency(ex.submit, n=n, warmup=warmup if r == 0 else 10))
    best = {name: min(rs, key=lambda s: s["p50_ms"]) for name, rs in runs.items()}
    out = {"host": best["host"], "podman": best["podman"],
           "p50_ratio": best["podman"]["p50_ms"] / best["host"]["p50_ms"],
           "p50_ms_all_rounds": {name: [round(s["p50_ms"], 3) for s in rs] for name, rs in runs.items()}}
    print(f"{engine}: p50 host {best['host']['p50_ms']:.2f} ms, in podman {best['podman']['p50_ms']:.2f} ms, "
          f"ratio {out['p50_ratio']:.2f}x (rounds: {out['p50_ms_all_rounds']})", flush=True)
    return out


def main() -> None:
    import cloudpickle

    import peers

    cloudpickle.register_pickle_by_value(peers)
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--engines", default="process,htex")
    ap.add_argument("--json")
    args = ap.parse_args()
    results = {}
    with marker_image("bench") as image:
        for engine in args.engines.split(","):
            results[engine] = compare(engine, image, args.n, args.warmup, args.rounds)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
