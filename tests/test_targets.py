"""Where a user class's load goes: its protocol's target, the standard port, the lab behind it.

The lab a target belongs to is found from the target's address and port (labs register their
directory; :func:`loadkit.defaults.find_lab`), never from the working directory.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest

from loadkit import defaults
from loadkit.errors import InputFileError, TargetError
from loadkit.profile.targets import parse_target_options, target_spec, user_target


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty lab registry and a working directory with no lab in it."""
    reg = tmp_path / "registry"
    monkeypatch.setenv("LOADKIT_LAB_REGISTRY", str(reg))
    monkeypatch.delenv("LOADKIT_LAB_DIR", raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return reg


def fake_lab(directory: Path, address: str, dns: int, imap: int, pop3: int, register: bool = True,
             started_unix_s: float = 1.0) -> Path:
    """A lab directory as a running lab leaves it: its state file (and its registry entry)."""
    directory.mkdir(parents=True)
    config = {"dir": str(directory), "address": address, "dns_port": dns, "imap_port": imap, "pop3_port": pop3}
    state = {"config": config, "components": [], "started_unix_s": started_unix_s}
    (directory / defaults.LAB_STATE_FILE_NAME).write_text(json.dumps(state))
    if register:
        defaults.register_lab(directory, f"{address}-{imap}-{directory.name}")
    return directory


@pytest.mark.parametrize(
    ("protocol", "tls", "port"),
    [("imap", False, 143), ("imap", True, 993), ("pop3", False, 110), ("pop3", True, 995), ("dns", False, 53)],
)
def test_an_address_without_a_port_gets_the_protocols_standard_port(registry, protocol, tls, port) -> None:
    assert user_target(protocol, "127.0.50.1", tls=tls).target.port == port


def test_the_target_labs_files_are_found_from_the_target_not_the_working_directory(registry, tmp_path) -> None:
    lab_dir = fake_lab(tmp_path / "second-lab", "127.0.50.1", 6353, 2143, 2110)
    found = user_target("imap", "127.0.50.1:2143")
    assert found.lab is not None and found.lab.dir == lab_dir
    assert found.file("accounts", None, "--mail-accounts") == lab_dir / "accounts.csv"
    assert user_target("dns", "127.0.50.1:6353").file("names", "", "--dns-names-file") == lab_dir / "names.txt"
    # a file given by the user wins over the lab's
    assert found.file("accounts", "mine.csv", "--mail-accounts") == Path("mine.csv")


def test_a_target_that_is_no_lab_needs_its_file_given_in_one_line(registry, tmp_path) -> None:
    fake_lab(tmp_path / "lab", "127.0.50.1", 6353, 2143, 2110)
    other_port = user_target("pop3", "127.0.50.1:9110")  # same address, a port the lab does not serve
    assert other_port.lab is None
    with pytest.raises(InputFileError, match=r"no accounts file given and no loadkit lab serves "
                       r"127\.0\.50\.1:9110: pass --mail-accounts FILE"):
        other_port.file("accounts", None, "--mail-accounts")


def test_a_stopped_lab_is_not_taken_for_a_running_one(registry, tmp_path) -> None:
    lab_dir = fake_lab(tmp_path / "lab", "127.0.50.1", 6353, 2143, 2110)
    (lab_dir / defaults.LAB_STATE_FILE_NAME).unlink()  # what `lab down` leaves
    assert user_target("imap", "127.0.50.1:2143").lab is None
    assert list(registry.iterdir()) == []  # its registry entry is forgotten


def test_a_leftover_lab_directory_does_not_shadow_the_lab_started_last(registry, tmp_path) -> None:
    fake_lab(tmp_path / "a-killed", "127.0.50.1", 6353, 2143, 2110, started_unix_s=100.0)
    now = fake_lab(tmp_path / "b-running", "127.0.50.1", 6353, 2143, 2110, started_unix_s=200.0)
    assert user_target("imap", "127.0.50.1:2143").lab.dir == now


def test_loadkit_lab_dir_moves_the_default_address_and_the_files_together(registry, tmp_path, monkeypatch) -> None:
    lab_dir = fake_lab(tmp_path / "other", "127.0.60.1", 7353, 3143, 3110, register=False)
    monkeypatch.setenv("LOADKIT_LAB_DIR", str(lab_dir))
    for protocol, port in (("dns", 7353), ("imap", 3143), ("pop3", 3110)):
        found = user_target(protocol)  # no target given: the lab's endpoint
        assert (found.target.address, found.target.port) == ("127.0.60.1", port)
        assert found.lab is not None and found.lab.dir == lab_dir
    assert user_target("dns").file("names", "", "--dns-names-file") == lab_dir / "names.txt"


def test_without_any_lab_the_default_is_the_default_labs_endpoint(registry) -> None:
    found = user_target("imap")
    assert str(found.target) == f"{defaults.LAB_ADDRESS}:{defaults.IMAP_PORT}" and found.lab is None


def test_each_protocol_takes_its_own_target_before_host() -> None:
    env = types.SimpleNamespace(host="127.0.0.9:1", parsed_options=types.SimpleNamespace(
        target=["imap=127.0.50.1:2143", "pop=127.0.50.1"]))
    assert target_spec(env, "imap") == "127.0.50.1:2143"
    assert target_spec(env, "pop3") == "127.0.50.1"
    assert target_spec(env, "dns") == "127.0.0.9:1"  # no dns target: --host
    assert target_spec(types.SimpleNamespace(host=None, parsed_options=None), "dns") is None


@pytest.mark.parametrize("bad", ["imap", "smtp=127.0.0.1:25", "imap="])
def test_a_malformed_target_option_is_one_line(bad: str) -> None:
    with pytest.raises(TargetError, match="is not PROTOCOL=HOST"):
        parse_target_options([bad])
