"""SMARTHOME_NATS_TLS_CA: the CA the services trust for the bus, a file that must exist."""

from __future__ import annotations

from pathlib import Path

import pytest

from libs import settings


def test_the_ca_is_read_as_a_resolved_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    monkeypatch.setenv("SMARTHOME_NATS_TLS_CA", str(ca))
    assert settings.load().nats_tls_ca == ca.resolve()


def test_unset_means_the_system_trust_store(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SMARTHOME_NATS_TLS_CA", raising=False)
    assert settings.load().nats_tls_ca is None


def test_a_missing_file_names_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMARTHOME_NATS_TLS_CA", str(tmp_path / "absent.crt"))
    with pytest.raises(settings.SettingsError, match="SMARTHOME_NATS_TLS_CA"):
        settings.load()
