"""Fixtures of the end-to-end tests."""

from __future__ import annotations

import pytest

from libs import embedded_nats


@pytest.fixture
def ports() -> tuple[int, int]:
    """Free ports for the gateway's HTTP and the bus."""
    return embedded_nats.free_port(), embedded_nats.free_port()
