"""Moved: the client is the `regionlimit-client` distribution (`regionlimit_client.client`).

Kept so `from region_node.client import RegionLimitClient` keeps working.
"""

from __future__ import annotations

from regionlimit_client.client import *  # noqa: F403
from regionlimit_client.client import __all__ as __all__
