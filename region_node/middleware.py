"""Moved: the middleware is the `regionlimit-client` distribution
(`regionlimit_client.middleware`).

Kept so `from region_node.middleware import RateLimitMiddleware` keeps working.
"""

from __future__ import annotations

from regionlimit_client.middleware import *  # noqa: F403
from regionlimit_client.middleware import __all__ as __all__
