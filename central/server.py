"""Run a central replica under uvicorn."""

from __future__ import annotations

import logging

import uvicorn

from central.app import build_central_app
from central.service import CentralService
from central.settings import CentralSettings
from sync.http.serving import uvicorn_config

log = logging.getLogger("regionlimit.central")


def serve_central(settings: CentralSettings, *, database_url: str) -> None:
    service = CentralService(settings, database_url=database_url)
    app = build_central_app(service)
    config = uvicorn_config(app, host=settings.host, port=settings.port,
                            log_level=settings.log_level)
    log.info("central replica %s listening on http://%s:%d", service.replica_id,
             settings.host, settings.port)
    # Server.run() builds the loop the config names (uvloop); asyncio.run() would not.
    uvicorn.Server(config).run()
