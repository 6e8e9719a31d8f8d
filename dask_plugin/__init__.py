"""Dask on Tether: ``Client(TetherCluster(endpoint_id=EP))`` runs Dask work on a Tether endpoint.

Proxy mode (default) needs no inbound connectivity; worker mode starts real Dask workers on the
endpoint's resources. See ``docs/dask.md``.
"""

from __future__ import annotations

from ._compat import CHECKED_VERSIONS, UnsupportedDistributed
from .cluster import TetherCluster, check_versions
from .proxy import EndpointTaskExecutor, ProxyWorker
from .workers import EndpointWorker

__all__ = ["CHECKED_VERSIONS", "EndpointTaskExecutor", "EndpointWorker", "ProxyWorker", "TetherCluster",
           "UnsupportedDistributed", "check_versions"]
