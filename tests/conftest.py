"""Shared fixtures: the real lab (unbound, dovecot, haproxy) on loopback.

- ``lab``: one lab for the whole session, default settings, on the address in
  ``LOADKIT_TEST_LAB_ADDRESS`` (default 127.0.0.1); yields its :class:`loadkit.lab.LabStatus`
  (``.dns``, ``.imap``, ``.pop3`` as (host, port), ``.names_file``, ``.accounts_file``,
  ``.proxies``...). Always brought down at the end, also when tests fail.
- ``make_lab(**overrides)``: a separate lab with special settings (any
  :class:`loadkit.lab.LabConfig` field) on a fresh random loopback address 127.x.y.1 whose ports
  are free, in a fresh directory; every lab it made is brought down when the test ends.
  Returns the lab's status; ``make_lab.labs`` holds the :class:`loadkit.lab.Lab` objects.
"""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from loadkit.errors import PortInUse
from loadkit.lab import Lab, LabConfig, LabStatus
from loadkit.lab import procs as lab_procs


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabStatus]:
    address = os.environ.get("LOADKIT_TEST_LAB_ADDRESS", "127.0.0.1")
    the_lab = Lab(LabConfig(dir=tmp_path_factory.mktemp("lab"), address=address))
    try:
        yield the_lab.up()
    finally:
        the_lab.down()


def free_lab_address(config_overrides: dict[str, Any] | None = None, tries: int = 30) -> str:
    """A random loopback address 127.x.y.1 (x, y in 10..250) on which the lab's ports are free."""
    rng = random.SystemRandom()
    last: Exception | None = None
    for _ in range(tries):
        address = f"127.{rng.randint(10, 250)}.{rng.randint(10, 250)}.1"
        cfg = LabConfig(address=address, **(config_overrides or {}))
        try:
            lab_procs.check_ports_free(address, cfg.all_ports(), [cfg.dns_port])
        except PortInUse as err:
            last = err
            continue
        return address
    raise RuntimeError(f"no free loopback address for a lab after {tries} tries: {last}")


def own_master(host: str = "127.0.0.1") -> list[str]:
    """Locust options for a run with ``--processes``: its master on a free loopback port of its own.
    Locust's default master port (5557, on every interface) is one per host: a second run at the same
    time cannot bind it (a traceback), and its forked workers join the first run's master instead."""
    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    return ["--master-bind-host", host, "--master-bind-port", str(port), "--master-host", host,
            "--master-port", str(port)]


class _LabFactory:
    """Callable fixture object: ``make_lab(**overrides) -> LabStatus``."""

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self.labs: list[Lab] = []

    def __call__(self, **overrides: Any) -> LabStatus:
        if "address" not in overrides:
            overrides["address"] = free_lab_address(
                {k: v for k, v in overrides.items() if k != "dir"}
            )
        if "dir" not in overrides:
            overrides["dir"] = self.base_dir / f"lab{len(self.labs)}"
        new_lab = Lab(LabConfig(**overrides))
        self.labs.append(new_lab)
        return new_lab.up()

    def teardown(self) -> None:
        errors = []
        for each in reversed(self.labs):
            try:
                each.down()
            except Exception as err:  # keep tearing the others down
                errors.append(err)
        if errors:
            raise errors[0]


@pytest.fixture
def make_lab(tmp_path: Path) -> Iterator[Callable[..., LabStatus]]:
    factory = _LabFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.teardown()
