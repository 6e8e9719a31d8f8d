"""A Dask computation on a Tether endpoint: the main job's Dask part (``run(stack)``).

``TetherCluster`` in its default proxy mode: the scheduler and a proxy worker run here, every
task runs on the endpoint through the service (nothing connects to this machine). Run on its own
with ``python examples/dask_workflow.py`` (it starts its own local service and endpoint).
"""

from __future__ import annotations

import logging
import time

import dask.array as da
import dask.dataframe as dd
from distributed import Client

from tether.dask import TetherCluster
from tether.local import LocalStack, local_stack

# distributed logs every P2P shuffle's start and end as a WARNING (with a LocalCluster too); they
# say nothing is wrong, so this example keeps them out of its output
logging.getLogger("distributed.shuffle").setLevel(logging.ERROR)


def run(stack: LocalStack) -> None:
    """Array reduction, dataframe groupby and a shuffle through a TetherCluster on ``stack``'s endpoint."""
    print("Dask on the endpoint (TetherCluster, proxy mode)...")
    t0 = time.perf_counter()
    with TetherCluster(endpoint_id=stack.endpoint_id, service=stack.service_url, token=stack.token) as cluster, \
            Client(cluster) as client:
        print(f"  cluster              = {cluster!r}")
        x = da.random.default_rng(42).random((4000, 4000), chunks=1000)
        print(f"  mean of 16M randoms  = {float(x.mean().compute()):.4f} (16 chunks, 1 reduction tree)")
        print(f"  (x @ x.T).trace()    = {float((x[:1000] @ x[:1000].T).trace().compute()):.1f}")

        df = dd.from_dict({"station": [f"s{i % 5}" for i in range(50_000)],
                           "temp": [10 + (i % 5) * 2 + (i % 17) * 0.1 for i in range(50_000)]}, npartitions=8)
        means = df.groupby("station").temp.mean().compute().round(2).to_dict()
        print(f"  mean temp by station = {means}")
        ordered = df.assign(i=df.index).set_index("temp").compute()  # a shuffle
        print(f"  set_index('temp')    = {len(ordered)} rows, sorted: {ordered.index.is_monotonic_increasing}")
        futures = client.map(lambda i: i * i, range(500))
        print(f"  500 futures          = sum {sum(client.gather(futures))}")
        counts = cluster.proxy_worker.endpoint_executor.counts
        print(f"  tasks run            = {counts['endpoint']} on the endpoint, {counts['local']} on the proxy")
    print(f"  Dask part done in {time.perf_counter() - t0:.2f}s")


if __name__ == "__main__":
    with local_stack(engine="process", workers=2) as s:
        run(s)
