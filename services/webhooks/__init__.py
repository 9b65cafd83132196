"""Webhooks: each subscription's events POSTed to its URL, signed, in order, retried with
back-off, dead-lettered after the retry window and re-drivable."""
