"""Lease mode at central: the authority, its grant arithmetic, state and transactions."""
