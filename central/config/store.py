"""Namespaces and per-identifier overrides at central, versioned.

Every change bumps ``config_state.version`` in its own transaction (an UPDATE of that one
row, which also serializes writers across replicas), and the changed row records the
version it was written at. Overrides store only the fields they replace; they are
resolved into full policies when the configuration is published.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from central.models import config_state, namespaces, overrides
from sync.errors import InvalidField
from sync.messages import ConfigUpdate, NamespacePolicies
from sync.policy import POLICY_FIELDS, Policy, build_policy, policy_from_dict

Row = dict[str, Any]


def _policy_row(policy: Policy) -> Row:
    return policy.to_dict()


def resolve_override(base: Policy, fields: Row) -> Policy:
    """The namespace's policy with the override's non-null fields replacing its own."""
    merged = base.to_dict()
    merged.update({k: v for k, v in fields.items() if k in POLICY_FIELDS and v is not None})
    if "algorithm" in fields and fields["algorithm"] not in (None, "token_bucket"):
        merged["burst"] = fields.get("burst")
    return policy_from_dict(merged)


class ConfigStore:
    def __init__(self, engine: AsyncEngine, *, clock: Any) -> None:
        self._engine = engine
        self._clock = clock

    async def _bump(self, connection: AsyncConnection) -> int:
        await connection.execute(update(config_state).where(config_state.c.id == 1)
                                 .values(version=config_state.c.version + 1))
        version = await connection.scalar(select(config_state.c.version)
                                          .where(config_state.c.id == 1))
        return int(version or 0)

    async def version(self) -> int:
        async with self._engine.connect() as connection:
            value = await connection.scalar(select(config_state.c.version))
            return int(value or 0)

    # --- namespaces --------------------------------------------------------------------

    async def put_namespace(self, name: str, policy: Policy) -> Row:
        async with self._engine.begin() as connection:
            version = await self._bump(connection)
            values = {**_policy_row(policy), "version": version, "updated_at": self._clock()}
            found = await connection.scalar(select(namespaces.c.name)
                                            .where(namespaces.c.name == name))
            if found is None:
                await connection.execute(namespaces.insert().values(name=name, **values))
            else:
                await connection.execute(update(namespaces).where(namespaces.c.name == name)
                                         .values(**values))
            # Overrides must still make sense under the new namespace policy.
            for row in await self._override_rows(connection, name):
                try:
                    resolve_override(policy, row)
                except InvalidField as exc:
                    raise InvalidField(exc.field, f"override {row['identifier_hash']} would "
                                       f"become invalid: {exc.message}") from None
        return {"namespace": name, **_policy_row(policy), "version": version}

    async def get_namespace(self, name: str) -> Row | None:
        async with self._engine.connect() as connection:
            row = (await connection.execute(select(namespaces).where(
                namespaces.c.name == name))).mappings().first()
        return None if row is None else _namespace_out(dict(row))

    async def list_namespaces(self) -> list[Row]:
        async with self._engine.connect() as connection:
            rows = (await connection.execute(select(namespaces).order_by(namespaces.c.name))
                    ).mappings().all()
        return [_namespace_out(dict(row)) for row in rows]

    async def delete_namespace(self, name: str) -> bool:
        async with self._engine.begin() as connection:
            result = await connection.execute(delete(namespaces)
                                              .where(namespaces.c.name == name))
            if not result.rowcount:
                return False
            await self._bump(connection)
        return True

    # --- overrides ---------------------------------------------------------------------

    async def put_override(self, name: str, identifier_hash: str, fields: Row) -> Row:
        async with self._engine.begin() as connection:
            base = await self._namespace_policy(connection, name)
            if base is None:
                raise LookupError(name)
            resolved = resolve_override(base, fields)
            version = await self._bump(connection)
            values = {k: fields.get(k) for k in POLICY_FIELDS}
            values.update(version=version, updated_at=self._clock())
            key = (overrides.c.namespace == name) & (
                overrides.c.identifier_hash == identifier_hash)
            found = await connection.scalar(select(overrides.c.version).where(key))
            if found is None:
                await connection.execute(overrides.insert().values(
                    namespace=name, identifier_hash=identifier_hash, **values))
            else:
                await connection.execute(update(overrides).where(key).values(**values))
        return _override_out(name, identifier_hash, fields, resolved, version)

    async def get_override(self, name: str, identifier_hash: str) -> Row | None:
        async with self._engine.connect() as connection:
            base = await self._namespace_policy(connection, name)
            for row in await self._override_rows(connection, name):
                if row["identifier_hash"] == identifier_hash and base is not None:
                    return _override_out(name, identifier_hash, row,
                                         resolve_override(base, row), row["version"])
        return None

    async def list_overrides(self, name: str) -> list[Row] | None:
        async with self._engine.connect() as connection:
            base = await self._namespace_policy(connection, name)
            if base is None:
                return None
            return [_override_out(name, row["identifier_hash"], row,
                                  resolve_override(base, row), row["version"])
                    for row in await self._override_rows(connection, name)]

    async def delete_override(self, name: str, identifier_hash: str) -> bool:
        async with self._engine.begin() as connection:
            result = await connection.execute(delete(overrides).where(
                (overrides.c.namespace == name)
                & (overrides.c.identifier_hash == identifier_hash)))
            if not result.rowcount:
                return False
            await self._bump(connection)
        return True

    # --- what nodes receive --------------------------------------------------------------

    async def load(self) -> ConfigUpdate:
        async with self._engine.connect() as connection:
            version = int(await connection.scalar(select(config_state.c.version)) or 0)
            rows = (await connection.execute(select(namespaces))).mappings().all()
            override_rows = (await connection.execute(select(overrides))).mappings().all()
        result: dict[str, NamespacePolicies] = {}
        for row in rows:
            result[row["name"]] = NamespacePolicies(_policy_of(dict(row)), {})
        for row in override_rows:
            target = result.get(row["namespace"])
            if target is None:
                continue
            try:
                target.overrides[row["identifier_hash"]] = resolve_override(target.policy,
                                                                            dict(row))
            except InvalidField:
                continue  # kept out until fixed; put_namespace refuses to create this
        return ConfigUpdate(version, result)

    async def _namespace_policy(self, connection: AsyncConnection, name: str
                                ) -> Policy | None:
        row = (await connection.execute(select(namespaces).where(namespaces.c.name == name))
               ).mappings().first()
        return None if row is None else _policy_of(dict(row))

    async def _override_rows(self, connection: AsyncConnection, name: str) -> list[Row]:
        rows = (await connection.execute(select(overrides).where(
            overrides.c.namespace == name).order_by(overrides.c.identifier_hash))
                ).mappings().all()
        return [dict(row) for row in rows]


def _policy_of(row: Row) -> Policy:
    return build_policy(**{k: row[k] for k in POLICY_FIELDS})


def _namespace_out(row: Row) -> Row:
    return {"namespace": row["name"], **_policy_of(row).to_dict(), "version": row["version"]}


def _override_out(name: str, identifier_hash: str, fields: Row, resolved: Policy,
                  version: int) -> Row:
    return {"namespace": name, "identifier_hash": identifier_hash,
            **{k: fields.get(k) for k in POLICY_FIELDS},
            "effective": resolved.to_dict(), "version": version}
