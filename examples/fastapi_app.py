"""A FastAPI app protected by regionlimit: 100 requests a minute per customer, per IP otherwise.

    regionlimit dev                                   # nodes on http://127.0.0.1:8081..8083
    uvicorn examples.fastapi_app:app --port 8000
    curl -i -H 'x-api-key: sk_demo_alice' http://127.0.0.1:8000/hello

`identify` authenticates the key before it picks the bucket: a key nobody issued counts
as anonymous and is limited by client IP, so minting fresh keys buys nothing.
"""

from __future__ import annotations

import os

from fastapi import FastAPI
from starlette.types import Scope

from regionlimit_client.middleware import RateLimitMiddleware

API_KEYS = {"sk_demo_alice": "alice", "sk_demo_bob": "bob"}  # your key store


def customer(scope: Scope) -> str | None:
    key = dict(scope["headers"]).get(b"x-api-key", b"").decode("latin-1")
    return API_KEYS.get(key)


app = FastAPI()
app.add_middleware(
    RateLimitMiddleware,
    url=os.environ.get("REGIONLIMIT_URL", "http://127.0.0.1:8081"),
    namespace="api",
    limit=100,
    duration="1m",
    identify=customer,
    exclude_paths=["/healthz"],
)


@app.get("/hello")
async def hello() -> dict[str, str]:
    return {"hello": "world"}


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}
