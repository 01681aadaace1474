from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from wsync.schemas import Health

from .deps import FleetDep

router = APIRouter(tags=["health"])


@router.get("/livez", response_model=Health, summary="The process is up")
def livez() -> Health:
    return Health(status="ok")


@router.get("/readyz", response_model=Health, summary="Ray and the database answer",
            responses={503: {"model": Health}})
def readyz(fleet: FleetDep):
    checks = fleet.ready_checks()
    ok = all(v == "ok" for v in checks.values())
    body = Health(status="ok" if ok else "unavailable", checks=checks)
    return body if ok else JSONResponse(body.model_dump(), status_code=503)
