"""Billing API: POST /v1/usage/query, as JSON or streamed CSV (API.md, "Usage")."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any, Literal

import anyio
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import DBAPIError
from starlette.background import BackgroundTask

from central.billing.usage_query import (
    UsageQuery,
    UsageRow,
    csv_header,
    csv_lines,
    iso,
    parse_request,
    response_body,
    wants_csv,
)
from central.billing.usage_store import UsageStore
from central.service import CentralService
from sync.api_errors import NOT_JSON, ApiError, ErrorBody, from_invalid_field
from sync.errors import InvalidField
from sync.identifiers import HASH_PATTERN, MAX_IDENTIFIER_BYTES
from sync.policy import NAMESPACE_PATTERN

log = logging.getLogger("regionlimit.central")
MAX_BODY_BYTES = 64 * 1024
QUERY_EXAMPLE: dict[str, Any] = {
    "namespace": "api", "identifier": "sk_live_abc123", "from": "2026-11-01",
    "to": "2026-12-01", "group_by": ["region", "month"]}
TIME_DOC = ("ISO date (UTC midnight), ISO datetime (an offset is converted; none means "
            "UTC) or epoch ms, on a whole hour. Default: the current calendar month.")


# Models for the OpenAPI document only: the body is validated by hand (usage_query.py) so
# that a bad field gets the contract's error shape, naming the field.
class UsageQueryBody(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"example": QUERY_EXAMPLE})

    namespace: str = Field(pattern=NAMESPACE_PATTERN)
    identifier: str | None = Field(default=None, min_length=1, max_length=MAX_IDENTIFIER_BYTES,
                                   description="Raw identifier; hashed on arrival")
    identifier_hash: str | None = Field(default=None, pattern=HASH_PATTERN,
                                        description="Instead of identifier")
    from_: str | int | None = Field(default=None, alias="from",
                                    description=f"Inclusive. {TIME_DOC}")
    to: str | int | None = Field(default=None, description=f"Exclusive. {TIME_DOC}")
    group_by: list[Literal["region", "day", "month"]] | None = Field(
        default=None, description="Any of region, day, month (not day and month)")


class UsageRowOut(BaseModel):
    identifier_hash: str
    region: str | None = Field(default=None, description="When grouped by region")
    period: str | None = Field(default=None, description="YYYY-MM or YYYY-MM-DD when grouped "
                               "by month or day")
    admitted: int
    denied: int


class UsageOut(BaseModel):
    namespace: str
    from_: str = Field(alias="from")
    to: str
    rows: list[UsageRowOut]


RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": UsageOut, "description": "JSON, or CSV (header line, the same columns) "
          "with Accept: text/csv",
          "content": {"text/csv": {"schema": {"type": "string"}}}},
    **{status: {"model": ErrorBody} for status in (400, 401, 413, 422, 503)},
}


def usage_router(service: CentralService) -> APIRouter:
    router = APIRouter()
    store = UsageStore(service.engine)

    @router.post(
        "/v1/usage/query",
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
            "schema": UsageQueryBody.model_json_schema(by_alias=True)}}}},
        response_class=Response, responses=RESPONSES,
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
            with _ledger_errors():
                async with store.snapshot() as snapshot:
                    rows = await snapshot.rows(query)
            return Response(orjson.dumps(response_body(query, rows)),
                            media_type="application/json")

        # CSV streams from a server-side cursor. The query runs before the response
        # starts, so its errors still get a status; the snapshot stays open until the
        # stream ends, or the background task closes it if the client left before that.
        stack = contextlib.AsyncExitStack()
        try:
            with _ledger_errors():
                snapshot = await stack.enter_async_context(store.snapshot())
                cursor = await snapshot.open_cursor(query)
        except BaseException:
            await stack.aclose()
            raise
        return StreamingResponse(
            _csv_stream(query, snapshot.chunks(query, cursor), stack),
            media_type="text/csv; charset=utf-8",
            headers={"content-disposition": f'attachment; filename="{_filename(query)}"'},
            background=BackgroundTask(stack.aclose))

    return router


@contextlib.contextmanager
def _ledger_errors() -> Iterator[None]:
    """A range that needs pruned detail is the client's 422; a database that fails or
    times out is a 503, not a 500."""
    try:
        yield
    except InvalidField as exc:
        raise from_invalid_field(exc) from None
    except (DBAPIError, OSError, TimeoutError) as exc:
        log.warning("usage query failed: %s", type(exc).__name__)
        raise ApiError(503, "ledger_unavailable",
                       "the ledger database is unavailable; try again") from None


async def _csv_stream(query: UsageQuery, chunks: AsyncIterator[list[UsageRow]],
                      stack: contextlib.AsyncExitStack) -> AsyncIterator[str]:
    columns = query.columns
    try:
        yield csv_header(columns)
        async for rows in chunks:
            yield csv_lines(columns, rows)
    finally:
        # A client that disconnects cancels this generator; the shield lets the
        # connection go back to the pool cleanly anyway.
        with anyio.CancelScope(shield=True):
            await stack.aclose()


def _filename(query: UsageQuery) -> str:
    start, end = iso(query.start)[:10], iso(query.end)[:10]
    return f"usage-{query.namespace.replace(':', '_')}-{start}-{end}.csv"
