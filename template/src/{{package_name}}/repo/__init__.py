"""Storage: implements the domain's repository Protocols with db (and later cache)."""
