"""Configuration at central: the namespaces and overrides store and the admin API."""
