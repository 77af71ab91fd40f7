"""Where the embedded lab listens and where it writes its files.

The lab is a target like any other: load code reaches it only through these defaults (and the
same ``--host``/profile options that point at a staging system), never by importing
:mod:`loadkit.lab`.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import NamedTuple

#: lab directory (relative to the working directory) that ``loadkit lab`` uses by default;
#: ``LOADKIT_LAB_DIR`` overrides it. Load code finds a lab from its target (:func:`find_lab`).
LAB_DIR = Path(os.environ.get("LOADKIT_LAB_DIR", ".loadkit/lab"))
#: loopback address every lab service binds to
LAB_ADDRESS = "127.0.0.1"

DNS_PORT = 5353
IMAP_PORT = 1143
POP3_PORT = 1110
#: the lab's unbound serves DNS over TLS on its DNS port plus this (5853 by default, after 853)
DOT_PORT_OFFSET = 500
#: ... and DNS over HTTPS (HTTP/2, path /dns-query) on its DNS port plus this (5854 by default)
DOH_PORT_OFFSET = 501



def lab_port(protocol: str) -> int:
    """The default lab's port for ``"dns"``, ``"imap"`` or ``"pop3"``."""
    return {"dns": DNS_PORT, "imap": IMAP_PORT, "pop3": POP3_PORT}[protocol]


#: zone served by the lab's unbound
LAB_ZONE = "lab.test."

NAMES_FILE_NAME = "names.txt"
ACCOUNTS_FILE_NAME = "accounts.csv"


def names_file(lab_dir: Path | None = None) -> Path:
    """The lab's names file (one DNS name per line)."""
    return (lab_dir or LAB_DIR) / NAMES_FILE_NAME


def accounts_file(lab_dir: Path | None = None) -> Path:
    """The lab's accounts file (CSV with header ``user,password``)."""
    return (lab_dir or LAB_DIR) / ACCOUNTS_FILE_NAME


def in_lab_dir(file_name: str) -> property:
    """A read-only property: the file ``file_name`` in the lab directory ``self.dir`` (of a running
    lab's :class:`LabInfo` and of :class:`loadkit.lab.Lab`, so both name the lab's files alike)."""
    return property(lambda self: Path(self.dir) / file_name, doc=f"the lab's {file_name}")


#: targets loadkit will send to when no allowlist is configured: loopback only
DEFAULT_ALLOWLIST = ("127.0.0.0/8", "::1/128")


# ------------------------------------------------------------------------------------------------
# finding a running lab from a target address, whatever the working directory
# ------------------------------------------------------------------------------------------------

#: the file a lab writes in its directory while it is up (``loadkit.lab`` keeps it current)
LAB_STATE_FILE_NAME = "state.json"


def lab_registry_dir() -> Path:
    """Where running labs leave a pointer to their directory, one file per lab.

    Per user and outside the working directory, so load code started anywhere finds the lab
    that serves its target; ``LOADKIT_LAB_REGISTRY`` moves it (tests, several users' labs).
    """
    env = os.environ.get("LOADKIT_LAB_REGISTRY")
    return Path(env) if env else Path(tempfile.gettempdir()) / f"loadkit-labs-{os.getuid()}"


def register_lab(lab_dir: Path, lab_id: str) -> None:
    """Called by the lab when it comes up: ``<registry>/<lab_id>`` names its directory.

    A pointer outlives ``lab down`` harmlessly: :func:`find_lab` only believes a directory
    whose state file is still there, and forgets the others.
    """
    registry = lab_registry_dir()
    # written and renamed like record.writer.write_json_atomic, which load code (a reader of this
    # module) may not import; a plain path, not JSON
    tmp = registry / f".{lab_id}.{os.getpid()}.tmp"
    try:
        registry.mkdir(parents=True, exist_ok=True)
        tmp.write_text(str(Path(lab_dir).absolute()))
        os.replace(tmp, registry / lab_id)
    except OSError:  # the lab still runs; only finding it from elsewhere is lost
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


class LabInfo(NamedTuple):
    """A running lab as its state file describes it (read by :func:`find_lab`)."""

    dir: Path
    address: str
    dns_port: int
    imap_port: int
    pop3_port: int
    started_unix_s: float = 0.0
    #: the DNS port behind the lab's firewall (``lab up --firewall-sessions``), 0 without one
    firewall_dns_port: int = 0
    #: the DNS-over-TLS port (``dns_port + DOT_PORT_OFFSET``)
    dot_port: int = 0

    names_file = in_lab_dir(NAMES_FILE_NAME)
    accounts_file = in_lab_dir(ACCOUNTS_FILE_NAME)

    def port(self, protocol: str) -> int:
        return {"dns": self.dns_port, "imap": self.imap_port, "pop3": self.pop3_port}[protocol]


def read_lab(lab_dir: Path) -> LabInfo | None:
    """The lab recorded in ``lab_dir``, or None when none is up there (or its state is unreadable)."""
    try:
        state = json.loads((Path(lab_dir) / LAB_STATE_FILE_NAME).read_text())
        config = state["config"]
        return LabInfo(Path(lab_dir).absolute(), str(config["address"]), int(config["dns_port"]),
                       int(config["imap_port"]), int(config["pop3_port"]),
                       float(state.get("started_unix_s") or 0.0),
                       # the lab's firewall guards dns_port + 1 (loadkit.lab.config)
                       int(config["dns_port"]) + 1 if config.get("firewall_sessions") else 0,
                       int(config["dns_port"]) + DOT_PORT_OFFSET)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def lab_dir() -> Path:
    """``LOADKIT_LAB_DIR`` as it is now, else ``.loadkit/lab``."""
    return Path(os.environ.get("LOADKIT_LAB_DIR") or ".loadkit/lab")


def _candidate_lab_dirs() -> list[Path]:
    dirs = [lab_dir()]
    registry = lab_registry_dir()
    try:
        entries = sorted(p for p in registry.iterdir() if not p.name.startswith("."))
    except OSError:
        entries = []
    for entry in entries:
        try:
            directory = Path(entry.read_text().strip())
            if not (directory / LAB_STATE_FILE_NAME).exists():
                entry.unlink()  # that lab is down (its state file goes with it): forget it
                continue
        except OSError:
            continue
        dirs.append(directory)
    return dirs


def find_lab(address: str | None = None, port: int | None = None) -> LabInfo | None:
    """The running lab that serves ``address:port`` (any of its DNS, IMAP, POP3 endpoints).

    Looked for in ``LOADKIT_LAB_DIR`` (else ``.loadkit/lab``) and in every lab registered in
    :func:`lab_registry_dir`. Without an address: the lab in ``LOADKIT_LAB_DIR`` if one is up
    there, else a registered lab on the default address and ports.
    """
    if address is None:
        here = read_lab(lab_dir())
        if here is not None:
            return here
        address = LAB_ADDRESS
    wanted = address.strip("[]")
    found = []
    for rank, directory in enumerate(_candidate_lab_dirs()):
        lab = read_lab(directory)
        if lab is None or lab.address != wanted:
            continue
        if port is None or port in (lab.dns_port, lab.imap_port, lab.pop3_port, lab.firewall_dns_port,
                                lab.dot_port):
            found.append((rank == 0 and "LOADKIT_LAB_DIR" in os.environ, lab.started_unix_s, lab))
    # LOADKIT_LAB_DIR when it serves the target; else the lab started last (a directory a
    # killed lab left behind with its state file cannot shadow the one running now)
    return max(found, key=lambda f: f[:2])[2] if found else None
