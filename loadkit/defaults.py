"""Where the embedded lab listens and where it writes its files.

The lab is a target like any other: load code reaches it only through these defaults (and the
same ``--host``/profile options that point at a staging system), never by importing
:mod:`loadkit.lab`.
"""

from __future__ import annotations

import os
from pathlib import Path

#: lab directory, relative to the working directory; ``LOADKIT_LAB_DIR`` overrides it
LAB_DIR = Path(os.environ.get("LOADKIT_LAB_DIR", ".loadkit/lab"))
#: loopback address every lab service binds to
LAB_ADDRESS = "127.0.0.1"

DNS_PORT = 5353
IMAP_PORT = 1143
POP3_PORT = 1110

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


#: targets loadkit will send to when no allowlist is configured: loopback only
DEFAULT_ALLOWLIST = ("127.0.0.0/8", "::1/128")
