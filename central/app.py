"""Central's HTTP API: health, readiness, metrics (admin routers are added in their modules)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from central.admin_api import admin_router
from central.service import CentralService
from central.usage_api import usage_router
from region_node.errors import ApiError


def error_response(status: int, code: str, message: str, field: str | None = None) -> Response:
    return Response(ApiError(status, code, message, field).to_json(), status_code=status,
                    media_type="application/json")


def build_central_app(service: CentralService) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="regionlimit central", version="1", lifespan=lifespan)

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

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> Response:
        return error_response(exc.status, exc.code, exc.message, exc.field)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ())]
        field = ".".join(loc[1:]) or None
        status = 400 if first.get("type") == "json_invalid" else 422
        return error_response(status, "invalid_json" if status == 400 else "invalid_field",
                              str(first.get("msg", "invalid")), field)

    return app
