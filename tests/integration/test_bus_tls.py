"""The bus over TLS with a certificate from a private CA (cert-manager's usual set-up): a
service given the CA (`SMARTHOME_NATS_TLS_CA`, `bus.connect(ca=...)`) connects and
publishes; without it the server's certificate is refused, promptly."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from libs import bus, bus_auth, bus_grants, embedded_nats

OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.skipif(OPENSSL is None, reason="the openssl CLI is not installed")


def _openssl(cwd: Path, *args: str) -> None:
    assert OPENSSL is not None
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def make_ca_and_server_cert(directory: Path) -> tuple[Path, Path, Path]:
    """(ca.crt, tls.crt, tls.key): a private CA and a server certificate for 127.0.0.1."""
    _openssl(
        directory, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        "-subj", "/CN=smarthome test CA", "-keyout", "ca.key", "-out", "ca.crt",
    )  # fmt: skip
    _openssl(
        directory, "req", "-newkey", "rsa:2048", "-nodes",
        "-subj", "/CN=127.0.0.1", "-keyout", "tls.key", "-out", "tls.csr",
    )  # fmt: skip
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl(
        directory, "x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "1", "-extfile", "san.ext", "-out", "tls.crt",
    )  # fmt: skip
    return directory / "ca.crt", directory / "tls.crt", directory / "tls.key"


@pytest.fixture
def tls_bus(tmp_path: Path) -> Iterator[tuple[str, Path, str]]:
    """(tls:// URL, CA file, the operator's password) of a private nats-server with TLS and
    the platform's users."""
    ca, cert, key = make_ca_and_server_cert(tmp_path)
    secrets_dir = tmp_path / "bus"
    port = embedded_nats.free_port()
    proc = embedded_nats.start(
        tmp_path / "nats",
        port,
        tmp_path / "nats.log",
        auth=bus_auth.embedded_authorization(secrets_dir),
        tls=(cert, key),
    )
    try:
        password = bus_grants.ensure_service_passwords(secrets_dir)["operator"].password
        yield f"tls://127.0.0.1:{port}", ca, password
    finally:
        proc.terminate()
        proc.wait(10)


async def test_a_service_given_the_private_ca_connects_and_publishes(
    tls_bus: tuple[str, Path, str],
) -> None:
    url, ca, password = tls_bus
    nc = await asyncio.wait_for(bus.connect(url, "tls-test", "operator", password, ca=ca), 5)
    try:
        got = await nc.subscribe("tls.test")
        await nc.publish("tls.test", b"over tls")
        await nc.flush(timeout=2)
        msg = await got.next_msg(timeout=2)
        assert msg.data == b"over tls"
        assert nc.is_connected and nc.last_error is None
    finally:
        await nc.close()


async def test_without_the_ca_the_server_certificate_is_refused(
    tls_bus: tuple[str, Path, str],
) -> None:
    url, _, password = tls_bus
    # nats-py raises the ssl error itself or wraps it, depending on where the handshake fails.
    with pytest.raises(Exception) as refused:
        await asyncio.wait_for(
            nats.connect(
                url,
                user="operator",
                password=password,
                max_reconnect_attempts=0,
                allow_reconnect=False,
                connect_timeout=2,
            ),
            8,
        )
    chain = [refused.value, refused.value.__cause__, refused.value.__context__]
    assert any(isinstance(e, ssl.SSLCertVerificationError) for e in chain) or (
        "certificate verify failed" in str(refused.value)
    ), repr(refused.value)
