"""The HTTP error shape of both APIs (API.md): errors with their status and the field at
fault, and the pydantic model that documents the body in OpenAPI."""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import BaseModel

from sync.errors import InvalidField, RegionLimitError


class ApiError(RegionLimitError):
    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code}
        if self.field is not None:
            error["field"] = self.field
        error["message"] = self.message
        return {"error": error}

    def to_json(self) -> bytes:
        return orjson.dumps(self.body())


class UnknownNamespace(ApiError):
    def __init__(self, namespace: str) -> None:
        super().__init__(404, "unknown_namespace",
                         f"namespace {namespace!r} is not configured; configure it or pass "
                         "limit and duration for an inline policy", "namespace")
        self.namespace = namespace


def from_invalid_field(exc: InvalidField) -> ApiError:
    return ApiError(422, exc.code, exc.message, exc.field)


NOT_JSON = ApiError(400, "invalid_json", "request body is not valid JSON")
UNAUTHORIZED = ApiError(401, "unauthorized", "missing or wrong bearer token")


class ErrorDetail(BaseModel):
    code: str
    field: str | None = None
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail
