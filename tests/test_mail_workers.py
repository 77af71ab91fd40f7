"""Mail storms over several Locust processes: each worker logs in with its own accounts.

Checked against a fake POP3 server that notes every ``USER`` it is sent, from real
``locust -f locustfiles/pop_storm.py`` runs with one process and with ``--processes 2``.
"""

from __future__ import annotations

import collections
import socket
import subprocess
import sys
import time
from pathlib import Path

import gevent
import pytest
from conftest import own_master
from locust.env import Environment
from mailfakes import FakeMailServer
from mailrun import write_accounts

from loadkit.generate.mail.users import account_slice, worker_share

ROOT = Path(__file__).resolve().parents[1]
LOCUST = str(Path(sys.executable).with_name("locust"))


# -- which accounts a process takes ------------------------------------------------------------------


@pytest.mark.parametrize("accounts_n, count", [(20, 2), (1000, 3), (7, 3), (5, 5)])
def test_processes_take_disjoint_parts_that_cover_the_file(accounts_n: int, count: int) -> None:
    parts = [account_slice(accounts_n, i, count) for i in range(count)]
    taken = [j for part in parts for j in part]
    assert sorted(taken) == list(range(accounts_n))  # every account once, none twice
    assert all(len(part) >= accounts_n // count for part in parts)


def test_one_process_takes_the_whole_file_from_the_first_account() -> None:
    assert account_slice(20, 0, 1) == range(20)


def test_fewer_accounts_than_processes_gives_each_process_one() -> None:
    assert [list(account_slice(2, i, 3)) for i in range(3)] == [[0], [1], [0]]


def test_a_local_runner_is_the_only_process() -> None:
    env = Environment()
    env.create_local_runner()
    try:
        assert worker_share(env) == (0, 1)
    finally:
        env.runner.quit()


# -- real locust runs ---------------------------------------------------------------------------------


class _Tap:
    """A server-side socket that notes the POP3 ``USER`` names it receives."""

    def __init__(self, sock: socket.socket, users: collections.Counter) -> None:
        self._sock = sock
        self._users = users
        self._buf = b""

    def recv(self, n: int) -> bytes:
        data = self._sock.recv(n)
        self._buf += data
        while b"\r\n" in self._buf:
            line, _, self._buf = self._buf.partition(b"\r\n")
            if line[:5].upper() == b"USER ":
                self._users[line[5:].decode()] += 1
        return data

    def __getattr__(self, name: str):
        return getattr(self._sock, name)


class RecordingPop3(FakeMailServer):
    """A well-behaved fake POP3 server that counts logins per user name."""

    def __init__(self) -> None:
        super().__init__("pop3", "ok")
        self.users: collections.Counter = collections.Counter()

    def _handle(self, sock: socket.socket, addr: object) -> None:
        super()._handle(_Tap(sock, self.users), addr)


def storm(tmp_path: Path, fake: RecordingPop3, users: int, *extra: str) -> str:
    accounts = write_accounts(tmp_path, 20)  # user0001..user0020
    proc = subprocess.Popen(
        [LOCUST, "-f", str(ROOT / "locustfiles" / "pop_storm.py"), "--headless", "-u", str(users),
         "-r", str(users), "-t", "5s", "--host", fake.address, "--mail-accounts", str(accounts),
         "--mail-dwell", "0.5", "--only-summary", *extra],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        gevent.sleep(0.1)  # the fake server runs in this process's greenlets meanwhile
    if proc.poll() is None:
        proc.kill()
    _, err = proc.communicate()
    assert proc.returncode in (0, 1), err[-3000:]
    return err


def test_one_process_logs_in_from_the_first_account(tmp_path: Path) -> None:
    with RecordingPop3() as fake:
        storm(tmp_path, fake, 5)
    assert set(fake.users) == {f"user{i:04d}" for i in range(1, 6)}


def test_two_worker_processes_never_share_an_account(tmp_path: Path) -> None:
    with RecordingPop3() as fake:
        err = storm(tmp_path, fake, 10, "--processes", "2", *own_master())
    # 5 users per worker; worker 1 takes accounts 1-10 of the file, worker 2 accounts 11-20
    assert set(fake.users) == {f"user{i:04d}" for i in (*range(1, 6), *range(11, 16))}, (fake.users, err[-2000:])
    assert "worker 1 of 2 logs in with accounts 1-10 of 20" in err
    assert "worker 2 of 2 logs in with accounts 11-20 of 20" in err
