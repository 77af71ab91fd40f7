"""Who may read a collector's endpoints: the Prometheus exporters' web configuration file.

``loadkit collect --listen`` beyond loopback serves what a target host's processes and kernel
show (process names, memory, socket queues), so it needs TLS and basic authentication, given in
the file format of the Prometheus exporter toolkit (``--web.config.file`` of node_exporter), so
one file serves both::

    tls_server_config:
      cert_file: collector.crt      # relative paths are relative to this file, as in the toolkit
      key_file: collector.key
    basic_auth_users:
      prometheus: $2y$10$X0h1gDsPszWURQaxFh.zoubFi6DXncSjhoQNJgRrnGs7EsimhC7zG   # bcrypt

The subset read here, each checked at start: ``tls_server_config`` with ``cert_file``,
``key_file``, ``client_ca_file``, ``client_auth_type`` (``NoClientCert`` or
``RequireAndVerifyClientCert``) and ``min_version`` (``TLS12``, ``TLS13``); ``basic_auth_users``
with bcrypt hashes (``$2a$``, ``$2b$``, ``$2y$``, as ``htpasswd -nBC 10`` makes). Any other key
(inline ``cert``/``key``, ``cipher_suites``, ``rate_limit``, ``http_server_config``...) is refused
in one line rather than silently ignored: a security setting that is not applied must not look
applied. Unlike the toolkit the file is read once, at start.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import ssl
import threading
from pathlib import Path
from typing import Any, NamedTuple

from loadkit.errors import CollectorError

_TLS_KEYS = ("cert_file", "key_file", "client_ca_file", "client_auth_type", "min_version")
_CLIENT_AUTH = ("NoClientCert", "RequireAndVerifyClientCert")
_MIN_VERSION = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
_BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$")
#: checked against when the user is unknown, so a wrong name costs as long as a wrong password
_DUMMY_HASH = b"$2b$10$fqYFUXbvhQf8IGpvnMFyveYyjmfSGR9O1M1.0Z9gsDVEqdpH0jpYq"


class WebConfig(NamedTuple):
    """A parsed, checked web configuration (:func:`load_web_config`)."""

    path: Path
    cert_file: Path | None
    key_file: Path | None
    client_ca_file: Path | None
    client_auth_type: str
    min_version: str
    users: dict[str, bytes]  #: user name -> bcrypt hash

    @property
    def tls(self) -> bool:
        return self.cert_file is not None

    def ssl_context(self) -> ssl.SSLContext:
        """The server's TLS context; a certificate or key that cannot be loaded is one line."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = _MIN_VERSION[self.min_version]
        try:
            ctx.load_cert_chain(str(self.cert_file), str(self.key_file))
            if self.client_ca_file is not None:
                ctx.load_verify_locations(cafile=str(self.client_ca_file))
        except (ssl.SSLError, OSError) as err:
            raise CollectorError(f"web config {self.path}: cannot load the certificate or key: "
                                 f"{getattr(err, 'reason', None) or err}") from err
        if self.client_auth_type == "RequireAndVerifyClientCert":
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


def load_web_config(path: str | Path) -> WebConfig:
    """Read and check a web configuration file; every problem is one :class:`CollectorError`."""
    import yaml  # only a collector given --web-config needs it

    path = Path(path)
    where = f"web config {path}"
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise CollectorError(f"{where}: cannot read it: {err.strerror or err}") from err
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise CollectorError(f"{where}{line}: not valid YAML ({getattr(err, 'problem', None) or err})") from err
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise CollectorError(f"{where}: must be a mapping with tls_server_config and basic_auth_users")
    unknown = sorted(set(data) - {"tls_server_config", "basic_auth_users"})
    if unknown:
        raise CollectorError(f"{where}: {unknown[0]!r} is not supported by loadkit collect "
                             "(supported: tls_server_config, basic_auth_users)")
    tls = _mapping(data.get("tls_server_config"), f"{where}: tls_server_config")
    bad = sorted(set(tls) - set(_TLS_KEYS))
    if bad:
        raise CollectorError(f"{where}: tls_server_config.{bad[0]} is not supported by loadkit collect "
                             f"(supported: {', '.join(_TLS_KEYS)})")
    files = {k: _file(tls.get(k), path, f"{where}: tls_server_config.{k}") for k in _TLS_KEYS[:3]}
    if (files["cert_file"] is None) != (files["key_file"] is None):
        raise CollectorError(f"{where}: tls_server_config needs both cert_file and key_file")
    auth_type = str(tls.get("client_auth_type", "NoClientCert"))
    if auth_type not in _CLIENT_AUTH:
        raise CollectorError(f"{where}: tls_server_config.client_auth_type {auth_type!r} is not supported "
                             f"(supported: {', '.join(_CLIENT_AUTH)})")
    if auth_type == "RequireAndVerifyClientCert" and files["client_ca_file"] is None:
        raise CollectorError(f"{where}: client_auth_type RequireAndVerifyClientCert needs client_ca_file")
    min_version = str(tls.get("min_version", "TLS12"))
    if min_version not in _MIN_VERSION:
        raise CollectorError(f"{where}: tls_server_config.min_version {min_version!r} is not one of TLS12, TLS13")
    users = {}
    for name, hashed in _mapping(data.get("basic_auth_users"), f"{where}: basic_auth_users").items():
        if not isinstance(hashed, str) or not hashed.startswith(_BCRYPT_PREFIXES) or len(hashed) != 60:
            raise CollectorError(f"{where}: basic_auth_users.{name}: not a bcrypt hash "
                                 "(make one with: htpasswd -nBC 10 \"\" | tr -d ':\\n')")
        users[str(name)] = hashed.encode()
    config = WebConfig(path, files["cert_file"], files["key_file"], files["client_ca_file"], auth_type,
                       min_version, users)
    if config.tls:
        config.ssl_context()  # a bad certificate or key fails now, not on the first scrape
    return config


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CollectorError(f"{where}: must be a mapping")
    return value


def _file(value: Any, config_path: Path, where: str) -> Path | None:
    if value is None or value == "":
        return None
    p = Path(str(value))
    p = p if p.is_absolute() else config_path.parent / p  # as the exporter toolkit resolves them
    if not p.is_file():
        raise CollectorError(f"{where}: {p} does not exist")
    return p


def is_loopback(host: str) -> bool:
    """``127.0.0.0/8``, ``::1`` and ``localhost``; a wildcard or any other address is not."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere


def check_exposure(host: str, port: int, config: WebConfig | None, insecure: bool) -> None:
    """Beyond loopback the endpoints need TLS and basic auth (a web config) or ``--insecure``."""
    if insecure or is_loopback(host):
        return
    missing = [] if config is None else [what for what, ok in
                                         (("tls_server_config", config.tls), ("basic_auth_users", config.users))
                                         if not ok]
    if config is None or missing:
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        need = "--web-config FILE with tls_server_config and basic_auth_users" if config is None else \
            f"{' and '.join(missing)} in {config.path}"
        raise CollectorError(f"--listen {where} is reachable beyond this host: give {need}, "
                             "or --insecure to serve plain HTTP to anyone who can connect")


class BasicAuth:
    """Checks ``Authorization: Basic`` headers against bcrypt hashes; a verified pair is cached
    (as a keyed digest, never the password) so a scrape every second costs one bcrypt check."""

    def __init__(self, users: dict[str, bytes]) -> None:
        self.users = dict(users)
        self._ok: set[bytes] = set()
        self._key = hashlib.sha256(repr(sorted(self.users.items())).encode()).digest()
        self._lock = threading.Lock()

    def check(self, header: str | None) -> bool:
        import bcrypt

        if not header or not header.startswith("Basic "):
            return False
        try:
            user, sep, password = base64.b64decode(header[6:].strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        if not sep:
            return False
        token = hmac.new(self._key, f"{user}\0{password}".encode(), hashlib.sha256).digest()
        with self._lock:
            if token in self._ok:
                return True
        hashed = self.users.get(user)
        try:
            ok = bcrypt.checkpw(password.encode(), hashed or _DUMMY_HASH) and hashed is not None
        except ValueError:
            ok = False
        if ok:
            with self._lock:
                self._ok.add(token)
        return ok
