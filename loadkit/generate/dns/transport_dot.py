"""DNS over TLS (RFC 7858) clients: a TLS connection per client, resumed on reconnect or not.

A DoT client (Android's Private DNS is the common one) keeps one TLS connection to its resolver,
closes it when idle and, for its next query, opens a new one, offering the session of the last
connection so the server can resume it (an abbreviated handshake: no certificate, one round trip
less of key exchange) instead of a full handshake. Which of the two a server has to do is what a
reconnect storm costs it, so each handshake is counted: ``dns.tls_handshakes_full`` and
``dns.tls_handshakes_resumed`` (``dns.tls_handshake_failures`` for the rest), generator counters
read in a run record through :mod:`loadkit.record.counters`.

The connection machinery (queues, pipelining, idle timeout, re-sends) is :mod:`.transport_tcp`;
this module makes the TLS connection. gevent's ``ssl`` wraps the gevent socket, so a handshake
waits cooperatively (no asyncio). TLS 1.3 sends its session tickets after the handshake, so a
client keeps its connection's session once the first reply has been read, not right after the
handshake.
"""

from __future__ import annotations

import ssl
from typing import Any

import gevent
from gevent import ssl as gssl

from .transport_tcp import ConnectFailed, StreamClient, TcpConnector, connect_tcp


def client_context(verify: bool) -> ssl.SSLContext:
    """A TLS client context. Unverified by default: a lab or staging resolver has a self-signed
    certificate (Android's opportunistic Private DNS does not verify either)."""
    ctx = gssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # RFC 8310: no TLS below 1.2 for DNS
    if verify:
        ctx.load_default_certs()
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class DotConnector(TcpConnector):
    """TCP connect, then a TLS handshake that offers the client's last session when ``resume``."""

    protocol = "dot"

    def __init__(self, family: int, address: str, port: int, *, resume: bool = True, verify: bool = False,
                 server_name: str | None = None, count: Any = None) -> None:
        super().__init__(family, address, port)
        self.resume = resume
        self.context = client_context(verify)
        self.server_name = server_name if verify else None
        #: counter callback (name, n): the handshake counters
        self.count = count or (lambda _name, _n: None)

    def open(self, client: StreamClient, timeout_s: float) -> Any:
        sock = connect_tcp(self.family, client.src, self.address, self.port, timeout_s)
        session = client.tls_session if self.resume else None
        try:
            tls = self.context.wrap_socket(sock, server_hostname=self.server_name, session=session,
                                           do_handshake_on_connect=False)
        except (ssl.SSLError, OSError, ValueError) as err:
            sock.close()
            self.count("dns.tls_handshake_failures", 1)
            raise ConnectFailed("tls_handshake_error", str(err)) from err
        try:
            with gevent.Timeout(timeout_s, ConnectFailed("tls_handshake_timeout", f"no TLS handshake in {timeout_s:g} s")):
                tls.do_handshake()
        except ConnectFailed:
            tls.close()
            self.count("dns.tls_handshake_failures", 1)
            raise
        except (ssl.SSLError, OSError, ValueError) as err:
            # a server at its connection limit often accepts and closes at once: EOF here
            tls.close()
            self.count("dns.tls_handshake_failures", 1)
            raise ConnectFailed("tls_handshake_error", str(err) or type(err).__name__) from err
        kind = "resumed" if tls.session_reused else "full"
        self.count(f"dns.tls_handshakes_{kind}", 1)
        return tls

    def after_first_reply(self, conn: Any, client: StreamClient) -> None:
        if self.resume:
            try:
                client.tls_session = conn.session  # holds the TLS 1.3 ticket by now
            except (AttributeError, ValueError, OSError):
                client.tls_session = None

    def lost_error_class(self, err: BaseException) -> str:
        if isinstance(err, ssl.SSLError) and not isinstance(err, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
            return "tls_error"
        return super().lost_error_class(err)

