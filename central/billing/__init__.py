"""Billing: the usage store, usage queries, their API and the rollups that keep the ledger small."""
