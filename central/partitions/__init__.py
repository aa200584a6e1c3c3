"""Per-partition building blocks of central at scale (pure, no I/O)."""
