"""HTTP plumbing shared by central and the node (uvicorn settings, FastAPI error handlers).

The only part of sync/ that may import a web framework (tests/unit/test_lint.py).
"""
