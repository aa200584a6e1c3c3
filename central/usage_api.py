"""Billing API: POST /v1/usage/query, as JSON or streamed CSV (API.md, "Usage")."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import anyio
import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse
from starlette.background import BackgroundTask

from central.auth import admin_guard
from central.service import CentralService
from central.usage_query import (
    UsageQuery,
    csv_header,
    csv_lines,
    iso,
    parse_request,
    response_body,
    wants_csv,
)
from central.usage_store import UsageSnapshot, UsageStore
from region_node.errors import NOT_JSON, ApiError, from_invalid_field
from sync.errors import InvalidField

MAX_BODY_BYTES = 64 * 1024
QUERY_EXAMPLE = {"namespace": "api", "identifier": "sk_live_abc123", "from": "2026-11-01",
                 "to": "2026-12-01", "group_by": ["region", "month"]}


def usage_router(service: CentralService) -> APIRouter:
    router = APIRouter(dependencies=[Depends(admin_guard(service.admin_token))])
    store = UsageStore(service.engine)

    @router.post(
        "/v1/usage/query",
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
            "example": QUERY_EXAMPLE}}}},
        responses={200: {"content": {"application/json": {}, "text/csv": {}}}},
        summary="Usage per identifier (and region, day or month) for billing",
    )
    async def query_usage(request: Request) -> Response:
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(413, "body_too_large", f"request body exceeds {MAX_BODY_BYTES} bytes")
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise NOT_JSON from None
        try:
            query = parse_request(payload, now_ms=service.clock(),
                                  hash_identifier=service.hasher.hash)
        except InvalidField as exc:
            raise from_invalid_field(exc) from None

        if not wants_csv(request.headers.get("accept")):
            try:
                async with store.snapshot() as snapshot:
                    rows = await snapshot.rows(query)
            except InvalidField as exc:  # the range needs detail that was pruned
                raise from_invalid_field(exc) from None
            return Response(orjson.dumps(response_body(query, rows)),
                            media_type="application/json")

        # CSV streams from a server-side cursor: the snapshot stays open until the stream
        # ends; the background task closes it if the client left before the stream began.
        stack = contextlib.AsyncExitStack()
        try:
            snapshot = await stack.enter_async_context(store.snapshot())
            statement = snapshot.statement(query)
        except BaseException as exc:
            await stack.aclose()
            if isinstance(exc, InvalidField):
                raise from_invalid_field(exc) from None
            raise
        return StreamingResponse(
            _csv_stream(query, snapshot, statement, stack),
            media_type="text/csv; charset=utf-8",
            headers={"content-disposition": f'attachment; filename="{_filename(query)}"'},
            background=BackgroundTask(stack.aclose))

    return router


async def _csv_stream(query: UsageQuery, snapshot: UsageSnapshot, statement: Any,
                      stack: contextlib.AsyncExitStack) -> AsyncIterator[str]:
    columns = query.columns
    try:
        yield csv_header(columns)
        async for rows in snapshot.stream(query, statement):
            yield csv_lines(columns, rows)
    finally:
        # A client that disconnects cancels this generator; the shield lets the
        # connection go back to the pool cleanly anyway.
        with anyio.CancelScope(shield=True):
            await stack.aclose()


def _filename(query: UsageQuery) -> str:
    start, end = iso(query.start)[:10], iso(query.end)[:10]
    return f"usage-{query.namespace.replace(':', '_')}-{start}-{end}.csv"
