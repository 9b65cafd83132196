"""Webhook subscriptions: create, list, delete; their deliveries and dead letters."""
