"""Run a region node under uvicorn (uvloop + httptools)."""

from __future__ import annotations

import logging

import uvicorn

from region_node.app import build_app
from region_node.node import RegionNode
from region_node.settings import NodeSettings
from sync.http.serving import uvicorn_config

log = logging.getLogger("regionlimit.node")


def serve_node(settings: NodeSettings, *, secret: str) -> None:
    node = RegionNode(settings, secret=secret)
    config = uvicorn_config(build_app(node), host=settings.host, port=settings.port,
                            log_level=settings.log_level, access_log=settings.access_log)
    log.info("region %s node %s listening on http://%s:%d", node.region, node.node_id,
             settings.host, settings.port)
    # Server.run() builds the loop the config names (uvloop); asyncio.run() would not.
    uvicorn.Server(config).run()
