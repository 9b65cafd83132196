"""Notification channels: `/api/v1/channels`."""
