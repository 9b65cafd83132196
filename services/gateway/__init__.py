"""The gateway: the platform's only HTTP surface (Litestar)."""
