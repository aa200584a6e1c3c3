"""The region node's ASGI application: raw check routes ahead of a FastAPI app that
serves health, readiness, metrics and the OpenAPI document."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from region_node.http import check_route, read_body
from region_node.node import RegionNode
from region_node.schemas import (
    BatchRequest,
    BatchResponse,
    CheckRequest,
    CheckResult,
    Readiness,
)
from sync.api_errors import ApiError, ErrorBody
from sync.http.errors import error_response, install_error_handlers

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody} for status in (400, 401, 404, 413, 422)}



def build_fastapi(node: RegionNode) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await node.start()
        try:
            yield
        finally:
            await node.stop()

    app = FastAPI(title="regionlimit region node", version="1", lifespan=lifespan)
    endpoints = node.endpoints
    install_error_handlers(app)

    async def reply(request: Request, handler: Any) -> Response:
        if not endpoints.authorized(request.headers.get("authorization", "").encode() or None):
            return error_response(401, "unauthorized", "missing or wrong bearer token")
        try:
            body = await read_body(request.receive)
        except ApiError as exc:
            return error_response(exc.status, exc.code, exc.message, exc.field)
        status, headers, payload = await handler(body)
        return Response(payload, status_code=status,
                        headers={k.decode(): v.decode() for k, v in headers})

    @app.post("/v1/check", response_model=CheckResult, responses=ERRORS,
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": {"$ref": "#/components/schemas/CheckRequest"}}
              }}})
    async def check(request: Request) -> Response:
        """Decide one check. 200 for every well-formed check, allowed or not."""
        return await reply(request, endpoints.check)

    @app.post("/v1/check/batch", response_model=BatchResponse, responses=ERRORS,
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": {"$ref": "#/components/schemas/BatchRequest"}}
              }}})
    async def check_batch(request: Request) -> Response:
        """Decide 1..1000 checks independently; an invalid one gets an error in its slot."""
        return await reply(request, endpoints.batch)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
    async def readyz() -> JSONResponse:
        body = node.readiness()
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    @app.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(node.metrics.render(), media_type="text/plain; version=0.0.4")

    schema_models = (CheckRequest, BatchRequest)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi
            document = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            for model in schema_models:
                definition = model.model_json_schema(ref_template="#/components/schemas/{model}")
                schemas.update(definition.pop("$defs", {}))
                schemas[model.__name__] = definition
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def build_app(node: RegionNode) -> Any:
    """Route the two check paths straight to plain ASGI handlers; the rest to FastAPI."""
    api = build_fastapi(node)
    fast_routes = {path: check_route(node.endpoints, path)
                   for path in ("/v1/check", "/v1/check/batch")}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            route = fast_routes.get(scope["path"])
            if route is not None:
                await route(scope, receive, send)
                return
        await api(scope, receive, send)

    app.fastapi = api  # type: ignore[attr-defined]
    return app
