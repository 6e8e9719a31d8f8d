"""What operators poll: ``/healthz`` and Prometheus ``/metrics``."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from tether import __version__
from tether.protocol import PROTOCOL_VERSION

from ..context import Services, services
from ..metrics import render
from ..models import Health

router = APIRouter()


@router.get("/healthz", response_model=Health, tags=["operations"])
async def healthz(svc: Services = Depends(services)) -> Health:
    return Health(status="ok", version=__version__, protocol=PROTOCOL_VERSION, uptime_s=time.time() - svc.started)


@router.get("/metrics", tags=["operations"], response_class=Response,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                             "description": "Prometheus exposition format"}})
async def metrics(svc: Services = Depends(services)) -> Response:
    """Prometheus exposition: endpoints online, their workers, task events."""
    body, headers = render(svc.metrics)
    return Response(body, headers=headers)
