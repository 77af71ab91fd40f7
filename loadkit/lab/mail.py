"""The lab's mail side: a dovecot backend, K dovecot proxies and haproxy in front of them.

- backend: IMAP and POP3 with a passwd-file of accounts ``user0001``... (plain passwords: this
  is a lab, and hashing 5,000 passwords with a slow scheme would make every start slow), maildirs
  owned by an unprivileged uid, a few messages in the first mailboxes.
- proxies: dovecot in proxy mode (static passdb ``proxy=y nopassword=y``: the backend checks the
  password), with one login process per connection (``service_count=1``, ``client_limit=1``),
  because the incident's proxies held memory per connection; each started inside its own
  memory cgroup by the caller.
- haproxy: TCP mode, round-robin over the proxies, health checks that expect each protocol's
  greeting, a stats socket whose ``scur`` gives the sessions per proxy.

Files read by dovecot's unprivileged processes (passwd-file, maildirs) live in the lab's runtime
directory, which is world-traversable, unlike a private lab directory (pytest's are 0700).
"""

from __future__ import annotations

import csv
import os
import pwd
import secrets
import socket
import time
from pathlib import Path
from typing import NamedTuple

from .config import LabConfig

#: accounts whose INBOX gets messages (the rest start empty; dovecot creates their maildir)
ACCOUNTS_WITH_MAIL = 50
MESSAGES_PER_MAILBOX = 3


def mail_ids() -> tuple[int, int]:
    """(uid, gid) that mail processes run as: nobody/nogroup as root (never root), else ours."""
    if os.geteuid() != 0:
        return os.geteuid(), os.getegid()
    try:
        pw = pwd.getpwnam("nobody")
        return pw.pw_uid, pw.pw_gid
    except KeyError:
        return 65534, 65534


def _chown(path: Path, uid: int, gid: int) -> None:
    if os.geteuid() == 0:
        os.chown(path, uid, gid)


def _privilege_lines() -> list[str]:
    """Users dovecot's processes run as. Without root, dovecot runs every process as the
    calling user, which needs the login and internal users to be that user and no chroots."""
    if os.geteuid() == 0:
        return ["default_login_user = dovenull", "default_internal_user = dovecot"]
    me = pwd.getpwuid(os.geteuid()).pw_name
    lines = [f"default_login_user = {me}", f"default_internal_user = {me}"]
    for service in ("imap-login", "pop3-login", "anvil", "auth", "auth-worker", "log", "stats",
                    "config", "dict", "imap", "pop3"):
        lines.append(f"service {service} {{\n  chroot =\n  user = {me}\n}}")
    return lines


def account_name(i: int) -> str:
    """The i-th account (1-based): ``user0001``."""
    return f"user{i:04d}"


def write_accounts(cfg: LabConfig, run_dir: Path, accounts_csv: Path) -> Path:
    """Accounts CSV (``user,password``) for load tests and the backend's passwd-file."""
    users = run_dir / "users"
    rows = [(account_name(i), secrets.token_hex(6)) for i in range(1, cfg.accounts + 1)]
    with open(accounts_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("user", "password"))
        w.writerows(rows)
    users.write_text("".join(f"{u}:{{PLAIN}}{p}\n" for u, p in rows))
    users.chmod(0o644)
    return users


def write_maildirs(cfg: LabConfig, run_dir: Path) -> Path:
    """Maildir root with a few messages in the first mailboxes, owned by the mail uid."""
    uid, gid = mail_ids()
    root = run_dir / "mail"
    root.mkdir(mode=0o755)
    _chown(root, uid, gid)
    now = int(time.time())
    for i in range(1, min(cfg.accounts, ACCOUNTS_WITH_MAIL) + 1):
        user = account_name(i)
        home = root / user
        for sub in ("", "Maildir", "Maildir/cur", "Maildir/new", "Maildir/tmp"):
            (home / sub).mkdir(mode=0o700, exist_ok=True)
            _chown(home / sub, uid, gid)
        for m in range(1, MESSAGES_PER_MAILBOX + 1):
            msg = home / "Maildir" / "new" / f"{now}.M{m}P{i}.loadkit-lab"
            msg.write_text(
                f"From: lab{m}@lab.test\r\nTo: {user}@lab.test\r\n"
                f"Subject: lab message {m} for {user}\r\n"
                f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime(now))}\r\n"
                f"Message-ID: <{now}.{m}.{user}@lab.test>\r\n\r\n"
                f"Message {m} of {MESSAGES_PER_MAILBOX} in the loadkit lab.\r\n"
                + "This line pads the body so a FETCH or RETR moves some bytes.\r\n" * 20
            )
            _chown(msg, uid, gid)
    return root


def _common(cfg: LabConfig, base_dir: Path, instance: str, log_path: Path) -> list[str]:
    return [
        f"base_dir = {base_dir}",
        f"state_dir = {base_dir}/state",
        f"instance_name = {instance}",
        "protocols = imap pop3",
        f"listen = {cfg.address}",
        "ssl = no",
        # plaintext LOGIN/USER+PASS on loopback: the lab has no TLS
        "disable_plaintext_auth = no",
        "auth_mechanisms = plain login",
        f"log_path = {log_path}",
        f"info_log_path = {log_path}",
        # microseconds and a year, so a login log can be replayed with its timing (login_replay)
        'log_timestamp = "%Y-%m-%d %H:%M:%S.%{usecs} "',
        *_privilege_lines(),
        # thousands of sessions from one loopback address are the point of the lab
        "mail_max_userip_connections = 100000",
        "default_process_limit = 5000",
        "default_client_limit = 20000",
        "default_vsz_limit = 0",
        "service anvil {\n  client_limit = 16000\n}",
        "service auth {\n  client_limit = 16000\n}",
        "service stats {\n  client_limit = 16000\n}",
        "service log {\n  client_limit = 16000\n}",
    ]


def _listeners(service: str, plain: str, address: str, port: int, extra: list[str]) -> str:
    body = [
        f"  inet_listener {plain} {{\n    address = {address}\n    port = {port}\n  }}",
        f"  inet_listener {plain}s {{\n    port = 0\n  }}",
        *(f"  {line}" for line in extra),
    ]
    return f"service {service} {{\n" + "\n".join(body) + "\n}"


def write_backend_conf(cfg: LabConfig, conf_dir: Path, run_dir: Path, users: Path,
                       mail_root: Path, log_path: Path) -> Path:
    uid, gid = mail_ids()
    imap_port, pop3_port = cfg.backend_ports()
    # the backend is not what is being measured: high-performance login (many clients each)
    login = ["service_count = 0", "client_limit = 1000", "process_min_avail = 1"]
    lines = _common(cfg, run_dir / "b", f"lk-{cfg.lab_id}-backend", log_path) + [
        f"mail_location = maildir:{mail_root}/%n/Maildir",
        f"first_valid_uid = {min(uid, 500)}",
        "pop3_uidl_format = %08Xu%08Xv",
        # the proxies are trusted, as in production: they pass the client's address on, so the
        # backend logs it. Failed logins are delayed as dovecot does by default: 2 s
        # (auth_failure_delay), growing with repeated failures from one client address (auth
        # penalty, up to 15 s).
        "login_trusted_networks = 127.0.0.0/8 ::1/128",
        f"passdb {{\n  driver = passwd-file\n  args = scheme=PLAIN username_format=%n {users}\n}}",
        f"userdb {{\n  driver = static\n  args = uid={uid} gid={gid} home={mail_root}/%n\n}}",
        _listeners("imap-login", "imap", cfg.address, imap_port, login),
        _listeners("pop3-login", "pop3", cfg.address, pop3_port, login),
    ]
    path = conf_dir / "dovecot-backend.conf"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_proxy_conf(cfg: LabConfig, n: int, conf_dir: Path, run_dir: Path, log_path: Path) -> Path:
    """Dovecot proxy ``n`` (1-based): forwards every login to the backend, one process each."""
    uid, gid = mail_ids()
    imap_port, pop3_port = cfg.proxy_ports(n)
    b_imap, b_pop3 = cfg.backend_ports()
    # as the incident's proxies: a login process per connection that lives for the session
    login = ["service_count = 1", "client_limit = 1", "process_limit = 5000",
             "process_min_avail = 0"]
    lines = _common(cfg, proxy_base_dir(run_dir, n), f"lk-{cfg.lab_id}-proxy{n}", log_path) + [
        # %s is the service (imap or pop3): each goes to the backend's port for it
        "passdb {\n  driver = static\n"
        f"  args = proxy=y host={cfg.address} port=%{{if;%s;eq;imap;{b_imap};{b_pop3}}} "
        "nopassword=y\n}",
        f"userdb {{\n  driver = static\n  args = uid={uid} gid={gid}\n}}",
        _listeners("imap-login", "imap", cfg.address, imap_port, login),
        _listeners("pop3-login", "pop3", cfg.address, pop3_port, login),
    ]
    path = conf_dir / f"dovecot-proxy{n}.conf"
    path.write_text("\n".join(lines) + "\n")
    return path


def proxy_base_dir(run_dir: Path, n: int) -> Path:
    """Proxy ``n``'s dovecot ``base_dir`` (its ``master.pid`` and sockets) in the runtime directory."""
    return run_dir / f"p{n}"


def dovecot_argv(conf: Path) -> list[str]:
    """How every dovecot of the lab is started (in the foreground, under a PID we record): at
    ``up`` and by the supervisor when it restarts a proxy."""
    return ["dovecot", "-F", "-c", str(conf)]


#: haproxy's connection ceiling: two descriptors per session must fit the open-file limit
HAPROXY_MAXCONN = 9000


def write_haproxy_conf(cfg: LabConfig, conf_dir: Path, stats_socket: Path) -> Path:
    lines = [
        "global",
        f"    maxconn {HAPROXY_MAXCONN}",
        f"    stats socket {stats_socket} mode 600 level admin",
        "defaults",
        "    mode tcp",
        "    timeout connect 3s",
        # held sessions idle for long stretches in a storm test
        "    timeout client 1h",
        "    timeout server 1h",
        "    timeout check 2s",
        f"    maxconn {HAPROXY_MAXCONN}",
    ]
    for proto, port, greeting in (("imap", cfg.imap_port, "* OK"), ("pop3", cfg.pop3_port, "+OK")):
        lines += [
            f"frontend {proto}",
            f"    bind {cfg.address}:{port}",
            f"    default_backend {proto}_proxies",
            f"backend {proto}_proxies",
            "    balance roundrobin",
            "    option tcp-check",
            f'    tcp-check expect string "{greeting}"',
        ]
        for n in range(1, cfg.proxies + 1):
            p_imap, p_pop3 = cfg.proxy_ports(n)
            p = p_imap if proto == "imap" else p_pop3
            lines.append(f"    server proxy{n} {cfg.address}:{p} check inter 1s fall 2 rise 1")
    path = conf_dir / "haproxy.cfg"
    path.write_text("\n".join(lines) + "\n")
    return path


class ServerStat(NamedTuple):
    """One haproxy server line of ``show stat`` (made by :func:`haproxy_stats`)."""

    backend: str
    server: str
    sessions: int  #: scur
    state: str  #: UP, DOWN, MAINT...


def haproxy_stats(stats_socket: Path, timeout_s: float = 1.0) -> list[ServerStat]:
    """Server rows from haproxy's stats socket; empty if haproxy does not answer."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout_s)
            s.connect(str(stats_socket))
            s.sendall(b"show stat\n")
            chunks = []
            while True:
                data = s.recv(65536)
                if not data:
                    break
                chunks.append(data)
    except OSError:
        return []
    text = b"".join(chunks).decode(errors="replace")
    lines = text.splitlines()
    if not lines or not lines[0].startswith("# "):
        return []
    header = lines[0][2:].split(",")
    ix = {name: i for i, name in enumerate(header)}
    out = []
    for line in lines[1:]:
        f = line.split(",")
        if len(f) < len(header) or f[ix["svname"]] in ("FRONTEND", "BACKEND"):
            continue
        out.append(ServerStat(f[ix["pxname"]], f[ix["svname"]], int(f[ix["scur"]] or 0),
                              f[ix["status"]]))
    return out
