"""TLS and STARTTLS sessions for both protocols, against fakes with a throwaway certificate."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from mailfakes import FakeMailServer
from mailrun import opts, storm, tracebacks, write_accounts


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    d = tmp_path_factory.mktemp("cert")
    key, crt = d / "key.pem", d / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(crt), "-days", "1", "-subj", "/CN=localhost"],
        check=True, capture_output=True,
    )
    return str(crt), str(key)


NAMES = {
    "imap": ("connect+greeting", "LOGIN", "SELECT", "FETCH", "LOGOUT"),
    "pop3": ("connect+greeting", "PASS", "STAT", "UIDL", "RETR", "QUIT"),
}


@pytest.mark.parametrize("mode", ["tls", "starttls"])
@pytest.mark.parametrize("protocol", ["imap", "pop3"])
def test_encrypted_sessions_run_every_phase(protocol: str, mode: str, cert, tmp_path: Path) -> None:
    accounts = write_accounts(tmp_path)
    crt, key = cert
    with FakeMailServer(protocol, "ok", tls=mode, certfile=crt, keyfile=key) as fake:
        out = storm(protocol, fake.address, opts(accounts, tls=mode, dwell_s=0.2), users=4, seconds=2.0)
    assert out["errors"] == {}, out["errors"]
    for name in NAMES[protocol]:
        assert out["requests"].get(name, 0) > 0, (name, out["requests"])
    if mode == "starttls" and protocol == "imap":
        assert out["requests"]["STARTTLS"] > 0
    assert tracebacks(out["records"]) == []


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
def test_tls_against_a_plain_server_is_classed(protocol: str, tmp_path: Path) -> None:
    accounts = write_accounts(tmp_path)
    with FakeMailServer(protocol, "ok") as fake:
        out = storm(protocol, fake.address, opts(accounts, tls="tls"), users=2, seconds=1.5)
    classes = {cls for (_name, cls) in out["errors"]}
    assert classes and classes <= {"tls_error", "timeout_greeting", "timeout_connect", "conn_reset",
                                   "eof_before_greeting"}, classes
    assert tracebacks(out["records"]) == []
