"""Central's HTTP API: health, readiness, metrics (admin routers are added in their modules)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from central.auth import AdminAuth
from central.billing.usage_api import usage_router
from central.config.admin_api import admin_router
from central.json_bodies import JsonBodies
from central.service import CentralService
from sync.http.errors import install_error_handlers


def build_central_app(service: CentralService) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="regionlimit central", version="1", lifespan=lifespan)

    install_error_handlers(app)
    app.add_middleware(JsonBodies)
    app.add_middleware(AdminAuth, token=service.admin_token)
    app.include_router(admin_router(service))
    app.include_router(usage_router(service))

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        body: dict[str, Any] = await service.readiness()
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    @app.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4")

    return app
