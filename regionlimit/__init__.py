"""regionlimit."""
