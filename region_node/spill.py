"""The spill file: usage a gracefully stopping node could not publish, for its next start.

Batches are stored encoded, under the node id that produced them, so the next process
publishes them as its former self's component and nothing is counted twice.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import msgpack

from sync.errors import MalformedMessage, UnsupportedVersion
from sync.messages import UsageBatch, decode_usage

log = logging.getLogger("regionlimit.node")
SPILL_VERSION = 1


def write_spill(path: Path, batches: list[bytes]) -> None:
    """Atomically replace the spill file (or remove it when there is nothing to keep)."""
    if not batches:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("wb") as handle:
        handle.write(msgpack.packb({"v": SPILL_VERSION, "batches": batches}))
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


def read_spill(path: Path) -> list[tuple[bytes, UsageBatch]]:
    """The spilled batches, each with its decoded form; a damaged file is kept aside."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    try:
        obj = msgpack.unpackb(data, raw=False)
        batches = [(raw, decode_usage(raw)) for raw in obj["batches"]]
    except (ValueError, KeyError, TypeError, MalformedMessage, UnsupportedVersion,
            msgpack.UnpackException) as exc:
        damaged = path.with_suffix(".damaged")
        path.replace(damaged)
        log.error("spill file %s is unreadable (%s); moved to %s", path, type(exc).__name__,
                  damaged)
        return []
    return batches
