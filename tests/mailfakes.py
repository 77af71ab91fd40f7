"""Small IMAP/POP3 servers that misbehave on purpose, for faults dovecot cannot produce.

Each fake is a gevent ``StreamServer`` on a free loopback port of the test process, so it runs
while the test's greenlets wait (the IMAP client itself runs on the bridge's loop thread).

Behaviours: ``ok`` (a well-behaved server with three messages), ``refuse`` (nothing listens),
``reset`` (accept, then RST), ``never_greet`` (accept, then silence), ``reject_login`` (NO /
-ERR to the login), ``bye_greeting`` (greet with BYE and close), ``silent_after_login`` (accept
the login, then never answer again), ``drop_after_login`` (accept the login and the mailbox,
then close the held session). ``tls="tls"`` serves implicit TLS, ``tls="starttls"`` answers
STARTTLS / STLS, with the given certificate.
"""

from __future__ import annotations

import socket
import struct

import gevent
from gevent import ssl as gssl
from gevent.server import StreamServer

BEHAVIOURS = (
    "ok",
    "refuse",
    "reset",
    "never_greet",
    "reject_login",
    "bye_greeting",
    "silent_after_login",
    "drop_after_login",
)

_MESSAGE = b"From: a@lab.test\r\nSubject: hello\r\n\r\nbody\r\n"


def _reset(sock: socket.socket) -> None:
    # SO_LINGER with zero timeout turns close() into a RST
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class _Lines:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def readline(self) -> bytes | None:
        while b"\r\n" not in self.buf:
            data = self.sock.recv(4096)
            if not data:
                return None
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line


class FakeMailServer:
    """``with FakeMailServer("imap", "reject_login") as fake: ... fake.port ...``"""

    def __init__(
        self, protocol: str, behaviour: str, host: str = "127.0.0.1",
        tls: str = "off", certfile: str | None = None, keyfile: str | None = None,
    ) -> None:
        assert protocol in ("imap", "pop3"), protocol
        assert behaviour in BEHAVIOURS, behaviour
        assert tls in ("off", "tls", "starttls"), tls
        self.protocol = protocol
        self.behaviour = behaviour
        self.host = host
        self.tls = tls
        self._ssl = None
        if tls != "off":
            self._ssl = gssl.SSLContext(gssl.PROTOCOL_TLS_SERVER)
            self._ssl.load_cert_chain(certfile, keyfile)
        self.port = 0
        self.connections_n = 0
        self._server: StreamServer | None = None
        self._held: list[socket.socket] = []

    def __enter__(self) -> "FakeMailServer":
        if self.behaviour == "refuse":
            s = socket.socket()
            s.bind((self.host, 0))
            self.port = s.getsockname()[1]
            s.close()  # nothing listens there now: connections are refused
            return self
        kw = {"ssl_context": self._ssl} if self.tls == "tls" else {}
        self._server = StreamServer((self.host, 0), self._handle, backlog=256, **kw)
        self._server.start()
        self.port = self._server.address[1]
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.stop(timeout=1)
        for s in self._held:
            try:
                s.close()
            except OSError:
                pass

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    # -- per connection ----------------------------------------------------------------------
    def _handle(self, sock: socket.socket, _addr: object) -> None:
        self.connections_n += 1
        b = self.behaviour
        if b == "reset":
            _reset(sock)
            return
        if b == "never_greet":
            self._held.append(sock)
            gevent.sleep(3600)
            return
        try:
            if self.protocol == "imap":
                self._imap(sock)
            else:
                self._pop3(sock)
        except OSError:
            pass
        finally:
            try:
                sock.close()
            except OSError:
                pass

    def _imap(self, sock: socket.socket) -> None:
        b = self.behaviour
        if b == "bye_greeting":
            sock.sendall(b"* BYE Too many connections, try later\r\n")
            return
        sock.sendall(b"* OK [CAPABILITY IMAP4rev1 IDLE LITERAL+] fake ready\r\n")
        lines = _Lines(sock)
        logged_in = False
        while True:
            line = lines.readline()
            if line is None:
                return
            if logged_in and b == "silent_after_login":
                continue
            tag, _, rest = line.partition(b" ")
            cmd = rest.split(b" ", 1)[0].upper()
            if cmd == b"STARTTLS" and self.tls == "starttls":
                sock.sendall(tag + b" OK Begin TLS negotiation now.\r\n")
                sock = self._ssl.wrap_socket(sock, server_side=True)
                lines = _Lines(sock)
            elif cmd == b"CAPABILITY":
                sock.sendall(b"* CAPABILITY IMAP4rev1 IDLE LITERAL+\r\n" + tag + b" OK done\r\n")
            elif cmd == b"LOGIN":
                if b == "reject_login":
                    sock.sendall(tag + b" NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
                    continue
                logged_in = True
                sock.sendall(tag + b" OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n")
            elif cmd == b"SELECT":
                sock.sendall(
                    b"* FLAGS (\\Seen)\r\n* 3 EXISTS\r\n* 0 RECENT\r\n* OK [UIDVALIDITY 1] ok\r\n"
                    + tag + b" OK [READ-WRITE] Select completed.\r\n"
                )
                if b == "drop_after_login":
                    gevent.sleep(0.2)
                    return
            elif cmd == b"FETCH":
                out = b""
                for i in (1, 2, 3):
                    hdr = b"From: a@lab.test\r\nSubject: m%d\r\n\r\n" % i
                    out += b"* %d FETCH (UID %d FLAGS () RFC822.SIZE 100 BODY[HEADER.FIELDS (FROM TO SUBJECT DATE)] {%d}\r\n%s)\r\n" % (
                        i, i, len(hdr), hdr)
                sock.sendall(out + tag + b" OK Fetch completed.\r\n")
            elif cmd == b"IDLE":
                sock.sendall(b"+ idling\r\n")
                done = lines.readline()
                if done is None:
                    return
                sock.sendall(tag + b" OK Idle completed.\r\n")
            elif cmd == b"LOGOUT":
                sock.sendall(b"* BYE Logging out\r\n" + tag + b" OK Logout completed.\r\n")
                return
            else:
                sock.sendall(tag + b" BAD unknown command\r\n")

    def _pop3(self, sock: socket.socket) -> None:
        b = self.behaviour
        if b == "bye_greeting":
            sock.sendall(b"-ERR too many connections\r\n")
            return
        sock.sendall(b"+OK fake ready.\r\n")
        lines = _Lines(sock)
        logged_in = False
        while True:
            line = lines.readline()
            if line is None:
                return
            if logged_in and b == "silent_after_login":
                continue
            cmd = line.split(b" ", 1)[0].upper()
            if cmd == b"STLS" and self.tls == "starttls":
                sock.sendall(b"+OK Begin TLS negotiation\r\n")
                sock = self._ssl.wrap_socket(sock, server_side=True)
                lines = _Lines(sock)
            elif cmd == b"USER":
                sock.sendall(b"+OK\r\n")
            elif cmd == b"PASS":
                if b == "reject_login":
                    sock.sendall(b"-ERR [AUTH] Authentication failed.\r\n")
                    continue
                logged_in = True
                sock.sendall(b"+OK Logged in.\r\n")
            elif cmd == b"STAT":
                sock.sendall(b"+OK 3 %d\r\n" % (3 * len(_MESSAGE)))
            elif cmd == b"UIDL":
                sock.sendall(b"+OK\r\n1 a\r\n2 b\r\n3 c\r\n.\r\n")
            elif cmd == b"RETR":
                sock.sendall(b"+OK %d octets\r\n" % len(_MESSAGE) + _MESSAGE + b".\r\n")
                if b == "drop_after_login":
                    gevent.sleep(0.2)
                    return
            elif cmd == b"QUIT":
                sock.sendall(b"+OK Logging out.\r\n")
                return
            else:
                sock.sendall(b"-ERR unknown command\r\n")
