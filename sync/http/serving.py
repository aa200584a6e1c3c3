"""uvicorn as both HTTP services run it (uvloop + httptools, no peer addresses logged)."""

from __future__ import annotations

import copy
from typing import Any

import uvicorn
from uvicorn.config import LOGGING_CONFIG

# Longer than the idle timeout of client pools (httpx: 5 s) and load balancers (60 s), so
# a client never reuses a connection the server is closing at that instant; with the
# default 5 s, pooled POSTs under load failed with "connection closed" now and then.
KEEP_ALIVE_S = 65


def log_config() -> dict[str, Any]:
    """uvicorn's logging, minus the client address in access lines: a peer address is an
    identifier too, and identifiers are never logged."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config["formatters"]["access"]["fmt"] = '%(levelprefix)s "%(request_line)s" %(status_code)s'
    return config


def uvicorn_config(app: Any, *, host: str, port: int, log_level: str,
                   access_log: bool = True) -> uvicorn.Config:
    return uvicorn.Config(app, host=host, port=port, loop="uvloop", http="httptools",
                          lifespan="on", log_level=log_level, access_log=access_log,
                          log_config=log_config(), timeout_graceful_shutdown=10,
                          timeout_keep_alive=KEEP_ALIVE_S)
