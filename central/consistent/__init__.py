"""Consistent mode at central: the authority, its pure decisions, state and transactions."""
