"""Admin API: namespaces, per-identifier overrides, identifier hashing.

Every change is stored first, then broadcast; a node that misses the broadcast gets the
configuration with its next snapshot.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from central.service import CentralService
from sync.api_errors import ApiError, ErrorBody
from sync.errors import InvalidField
from sync.identifiers import HASH_PATTERN, IDENTIFIER_RULE, MAX_IDENTIFIER_BYTES, is_identifier
from sync.policy import DURATION_PATTERN, NAMESPACE_PATTERN, build_policy

NamespaceName = Annotated[str, Path(pattern=NAMESPACE_PATTERN)]
IdentifierHash = Annotated[str, Path(pattern=HASH_PATTERN)]
Algorithm = Literal["fixed_window", "sliding_window", "token_bucket"]
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody} for status in (400, 401, 404, 422)}


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class PolicyFields(Strict):
    """Every policy field, optional: what an override may replace."""

    limit: int | None = Field(default=None, ge=1)
    duration: str | None = Field(default=None, pattern=DURATION_PATTERN)
    algorithm: Algorithm | None = None
    burst: int | None = Field(default=None, ge=1)
    mode: Literal["fast", "consistent", "lease"] | None = None
    on_unavailable: Literal["open", "closed"] | None = None
    timeout: str | None = Field(default=None, pattern=DURATION_PATTERN)
    shadow_mode: bool | None = Field(default=None, description="Count and bill every check "
                                     "but never deny; answers say shadowed: true instead")


class NamespaceBody(PolicyFields):
    limit: int = Field(ge=1)
    duration: str = Field(pattern=DURATION_PATTERN)


class OverrideBody(PolicyFields):
    identifier: str = Field(min_length=1, max_length=MAX_IDENTIFIER_BYTES,
                            description="Raw identifier; hashed on arrival, never stored")


class IdentifierBody(Strict):
    identifier: str = Field(min_length=1, max_length=MAX_IDENTIFIER_BYTES)


class NamespaceOut(BaseModel):
    namespace: str
    limit: int
    duration: str
    algorithm: str
    burst: int | None
    mode: str
    on_unavailable: str
    timeout: str
    shadow_mode: bool
    version: int


class PolicyOut(BaseModel):
    limit: int
    duration: str
    algorithm: str
    burst: int | None
    mode: str
    on_unavailable: str
    timeout: str
    shadow_mode: bool


class OverrideOut(BaseModel):
    namespace: str
    identifier_hash: str
    limit: int | None
    duration: str | None
    algorithm: str | None
    burst: int | None
    mode: str | None
    on_unavailable: str | None
    timeout: str | None
    shadow_mode: bool | None
    effective: PolicyOut
    version: int


class NamespaceList(BaseModel):
    namespaces: list[NamespaceOut]


class OverrideList(BaseModel):
    overrides: list[OverrideOut]


class HashOut(BaseModel):
    identifier_hash: str


def _identifier_bytes_ok(identifier: str) -> None:
    if not is_identifier(identifier):
        raise ApiError(422, "invalid_field", IDENTIFIER_RULE, "identifier")


def _not_found(what: str, field: str) -> ApiError:
    return ApiError(404, "not_found", f"{what} not found", field)


def admin_router(service: CentralService) -> APIRouter:
    router = APIRouter(responses=ERRORS)
    config = service.config

    @router.put("/v1/namespaces/{namespace}", response_model=NamespaceOut)
    async def put_namespace(namespace: NamespaceName, body: NamespaceBody) -> Any:
        try:
            policy = build_policy(**body.model_dump())
            stored = await config.put_namespace(namespace, policy)
        except InvalidField as exc:
            raise ApiError(422, exc.code, exc.message, exc.field) from None
        await service.publish_config()
        return stored

    @router.get("/v1/namespaces", response_model=NamespaceList)
    async def list_namespaces() -> Any:
        return {"namespaces": await config.list_namespaces()}

    @router.get("/v1/namespaces/{namespace}", response_model=NamespaceOut)
    async def get_namespace(namespace: NamespaceName) -> Any:
        found = await config.get_namespace(namespace)
        if found is None:
            raise _not_found(f"namespace {namespace!r}", "namespace")
        return found

    @router.delete("/v1/namespaces/{namespace}", status_code=204, response_class=Response)
    async def delete_namespace(namespace: NamespaceName) -> Response:
        if not await config.delete_namespace(namespace):
            raise _not_found(f"namespace {namespace!r}", "namespace")
        await service.publish_config()
        return Response(status_code=204)

    @router.put("/v1/namespaces/{namespace}/overrides", response_model=OverrideOut)
    async def put_override(namespace: NamespaceName, body: OverrideBody) -> Any:
        _identifier_bytes_ok(body.identifier)
        fields = body.model_dump(exclude={"identifier"})
        key_hash = service.hasher.hash(body.identifier)
        try:
            stored = await config.put_override(namespace, key_hash, fields)
        except LookupError:
            raise _not_found(f"namespace {namespace!r} (configure it at central first)",
                             "namespace") from None
        except InvalidField as exc:
            raise ApiError(422, exc.code, exc.message, exc.field) from None
        await service.publish_config()
        return stored

    @router.get("/v1/namespaces/{namespace}/overrides", response_model=OverrideList)
    async def list_overrides(namespace: NamespaceName) -> Any:
        found = await config.list_overrides(namespace)
        if found is None:
            raise _not_found(f"namespace {namespace!r}", "namespace")
        return {"overrides": found}

    @router.get("/v1/namespaces/{namespace}/overrides/{identifier_hash}",
                response_model=OverrideOut)
    async def get_override(namespace: NamespaceName, identifier_hash: IdentifierHash) -> Any:
        found = await config.get_override(namespace, identifier_hash)
        if found is None:
            raise _not_found("override", "identifier_hash")
        return found

    @router.delete("/v1/namespaces/{namespace}/overrides/{identifier_hash}",
                   status_code=204, response_class=Response)
    async def delete_override(namespace: NamespaceName, identifier_hash: IdentifierHash
                              ) -> Response:
        if not await config.delete_override(namespace, identifier_hash):
            raise _not_found("override", "identifier_hash")
        await service.publish_config()
        return Response(status_code=204)

    @router.post("/v1/identifiers/hash", response_model=HashOut)
    async def hash_identifier(body: IdentifierBody) -> Any:
        _identifier_bytes_ok(body.identifier)
        return {"identifier_hash": service.hasher.hash(body.identifier)}

    return router
