"""`loadkit collect --listen` is safe to leave on a target host.

- beyond loopback it needs TLS and basic auth (a Prometheus exporter web config) or --insecure,
  and says so in one line (checked without binding anything beyond loopback);
- with a web config it serves HTTPS only and answers 401 without the right user and password
  (a self-signed certificate made by openssl here, on a loopback address);
- /snapshot never carries a secret from a command line.
"""

from __future__ import annotations

import base64
import random
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import bcrypt
import pytest

from loadkit.cli import main as cli_main
from loadkit.errors import CollectorError
from loadkit.observe.exporter import redact
from loadkit.observe.webconfig import check_exposure, load_web_config

PASSWORD = "s3cret-scrape"


def _free_address() -> tuple[str, int]:
    address = f"127.{random.randint(64, 250)}.{random.randint(1, 250)}.{random.randint(1, 250)}"
    with socket.socket() as s:
        s.bind((address, 0))
        return address, s.getsockname()[1]


@pytest.fixture
def tls_files(tmp_path: Path) -> dict[str, Path]:
    """A self-signed certificate for 127.0.0.0/8 names and a web config that uses it."""
    cert, key = tmp_path / "collector.crt", tmp_path / "collector.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "2", "-subj", "/CN=loadkit-test-collector", "-addext", "subjectAltName=DNS:localhost"],
        check=True, capture_output=True, timeout=60)
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode().replace("$2b$", "$2y$")  # htpasswd's prefix
    web = tmp_path / "web.yml"
    # relative file names: resolved against the config's folder, as the exporter toolkit does
    web.write_text(f"tls_server_config:\n  cert_file: collector.crt\n  key_file: collector.key\n"
                   f"basic_auth_users:\n  prometheus: '{hashed}'\n")
    return {"cert": cert, "key": key, "web": web, "hash": Path(hashed)}


def _get(url: str, cafile: Path | None, user: str | None = None, password: str | None = None):
    ctx = None
    if url.startswith("https"):
        ctx = ssl.create_default_context(cafile=str(cafile))
        ctx.check_hostname = False  # the certificate names localhost; the address is a random 127/8
    req = urllib.request.Request(url)
    if user is not None:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10, context=ctx) as resp:
            return resp.status, resp.read().decode(), dict(resp.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(), dict(err.headers)


def _wait_listening(address: str, port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1]
        with socket.socket() as c:
            if c.connect_ex((address, port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError("the collector did not listen")


def test_tls_and_basic_auth_from_a_web_config(tls_files, tmp_path: Path) -> None:
    address, port = _free_address()
    # a process with secrets on its command line, as some daemons are started
    marker = f"loadkit-victim-{random.randint(10**8, 10**9)}"
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", marker,
                               "--password", "hunter2", "--token=tok-XYZ", "db_password=pw-ABC",
                               "imap://user0001:mailpw-QRS@127.0.0.1"])
    collector = subprocess.Popen(
        [sys.executable, "-m", "loadkit", "collect", "--group", f"victim=cmdline:{marker}", "--interval", "0.2",
         "--duration", "60", "--listen", f"{address}:{port}", "--web-config", str(tls_files["web"])],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_listening(address, port, collector)
        base = f"https://{address}:{port}"
        # plain HTTP gets no answer from a TLS server
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            _get(f"http://{address}:{port}/metrics", None, "prometheus", PASSWORD)
        status, _, headers = _get(base + "/metrics", tls_files["cert"])
        assert status == 401 and headers.get("WWW-Authenticate", "").startswith("Basic")
        assert _get(base + "/snapshot", tls_files["cert"], "prometheus", "wrong")[0] == 401
        assert _get(base + "/metrics", tls_files["cert"], "nobody", PASSWORD)[0] == 401
        deadline = time.monotonic() + 20
        while True:
            status, body, _ = _get(base + "/snapshot?members=1", tls_files["cert"], "prometheus", PASSWORD)
            assert status == 200
            if '"victim"' in body and marker in body or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert marker in body  # the member and its command line are there ...
        for secret in ("hunter2", "tok-XYZ", "pw-ABC", "mailpw-QRS"):
            assert secret not in body  # ... without its secrets
        assert "--password ***" in body and "--token=***" in body and "db_password=***" in body
        status, body, _ = _get(base + "/metrics", tls_files["cert"], "prometheus", PASSWORD)
        assert status == 200 and "loadkit_collector_samples_total" in body
    finally:
        collector.terminate()  # the collector and the victim are the processes this test started
        victim.kill()
        collector.communicate(timeout=20)
        victim.wait(timeout=10)
    assert collector.returncode == 0


@pytest.mark.parametrize("listen", ["0.0.0.0:9108", "[::]:9108", "192.0.2.10:9108", "collector.example:9108"])
def test_listen_beyond_loopback_without_tls_and_auth_is_refused_in_one_line(listen, capsys) -> None:
    assert cli_main(["collect", "--listen", listen, "--duration", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert "is reachable beyond this host" in err and "--web-config" in err and "--insecure" in err


def test_a_web_config_beyond_loopback_needs_both_tls_and_users(tmp_path: Path, tls_files) -> None:
    tls_only = tmp_path / "tls-only.yml"
    tls_only.write_text(f"tls_server_config:\n  cert_file: {tls_files['cert']}\n  key_file: {tls_files['key']}\n")
    with pytest.raises(CollectorError, match="basic_auth_users in"):
        check_exposure("0.0.0.0", 9108, load_web_config(tls_only), insecure=False)
    auth_only = tmp_path / "auth-only.yml"
    auth_only.write_text(f"basic_auth_users:\n  p: '{tls_files['hash']}'\n")
    with pytest.raises(CollectorError, match="tls_server_config in"):
        check_exposure("192.0.2.10", 9108, load_web_config(auth_only), insecure=False)
    check_exposure("0.0.0.0", 9108, load_web_config(tls_files["web"]), insecure=False)
    check_exposure("0.0.0.0", 9108, None, insecure=True)  # said out loud
    check_exposure("127.0.0.1", 9108, None, insecure=False)  # loopback: this host only
    check_exposure("::1", 9108, None, insecure=False)


@pytest.mark.parametrize(
    "text, words",
    [
        ("rate_limit:\n  burst: 20\n", "'rate_limit' is not supported"),
        ("tls_server_config:\n  cert: inline\n", "tls_server_config.cert is not supported"),
        ("basic_auth_users:\n  alice: plain-password\n", "basic_auth_users.alice: not a bcrypt hash"),
        ("tls_server_config:\n  cert_file: nope.crt\n  key_file: nope.key\n", "nope.crt does not exist"),
        ("tls_server_config: [1, 2\n", "not valid YAML"),
        ("- a\n- b\n", "must be a mapping"),
    ],
)
def test_bad_web_configs_are_one_line(text: str, words: str, tmp_path: Path, capsys) -> None:
    web = tmp_path / "web.yml"
    web.write_text(text)
    assert cli_main(["collect", "--listen", "127.0.0.1:0", "--web-config", str(web), "--duration", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err and "Traceback" not in err


def test_a_key_that_does_not_match_its_certificate_is_refused_at_start(tmp_path: Path, tls_files) -> None:
    other = tmp_path / "other.key"
    subprocess.run(["openssl", "genrsa", "-out", str(other), "2048"], check=True, capture_output=True, timeout=60)
    web = tmp_path / "mismatch.yml"
    web.write_text(f"tls_server_config:\n  cert_file: {tls_files['cert']}\n  key_file: {other}\n")
    with pytest.raises(CollectorError, match="cannot load the certificate or key"):
        load_web_config(web)


@pytest.mark.parametrize(
    "cmdline, expected",
    [
        ("dovecot -c /etc/dovecot.conf", "dovecot -c /etc/dovecot.conf"),
        ("app --password hunter2 --port 1", "app --password *** --port 1"),
        ("app --pass=hunter2", "app --pass=***"),
        ("app --secret hunter2 --token t0k", "app --secret *** --token ***"),
        ("env PGPASSWORD=hunter2 psql", "env PGPASSWORD=*** psql"),
        ("app password=hunter2 user=bob", "app password=*** user=bob"),
        ("app api_key:k3y", "app api_key:***"),
        ("fetch imaps://bob:hunter2@mail.example/INBOX", "fetch imaps://bob:***@mail.example/INBOX"),
        ("/usr/bin/mysql -uroot -phunter2 db", "/usr/bin/mysql -uroot -p*** db"),
        ("sshpass -p hunter2 ssh -p 2222 host", "sshpass -p *** ssh -p 2222 host"),
        ("ssh -p 2222 host", "ssh -p 2222 host"),  # -p is a port here, not a password
        ("redis-cli -a hunter2 -p 6379", "redis-cli -a *** -p 6379"),
        ("locust -f x.py --mail-password hunter2", "locust -f x.py --mail-password ***"),
        ("app --password", "app --password"),  # nothing follows: nothing to hide
    ],
)
def test_redact_hides_secrets_in_command_lines(cmdline: str, expected: str) -> None:
    assert redact(cmdline) == expected
    assert redact(redact(cmdline)) == expected  # redacting twice changes nothing
