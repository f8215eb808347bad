"""Data plane: the wake-on-request HTTPS edge proxy, its control API and CLI."""
