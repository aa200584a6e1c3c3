"""Container HEALTHCHECK for the regionlimit image (standard library only).

Exits 0 when GET /healthz answers 200 on the port this container serves: REGIONLIMIT_PORT
when set, else the node's default 8081, then central's default 8080. An argument names
another path: compose checks central with `healthcheck.py /readyz`, so that the nodes
start only once central is ready (database at the shipped schema, NATS connected).
"""

from __future__ import annotations

import os
import sys
import urllib.request


def healthy(port: str, path: str = "/healthz") -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as answer:
            return bool(answer.status == 200)
    except (OSError, ValueError):
        return False


def main() -> int:
    configured = os.environ.get("REGIONLIMIT_PORT")
    ports = [configured] if configured else ["8081", "8080"]
    path = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1].startswith("/") else "/healthz"
    return 0 if any(healthy(port, path) for port in ports) else 1


if __name__ == "__main__":
    sys.exit(main())
