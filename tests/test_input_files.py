"""Input files users already have: dnsperf/resperf query files, BIND and unbound query logs, and
imaptest users files, read by the one names reader and the one accounts reader, and driving the lab."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import dns.message
import pytest

from loadkit.errors import InputFileError
from loadkit.generate.dns import wire
from loadkit.generate.dns.query_files import NameQuery, load_queries
from loadkit.generate.mail.users import read_accounts

REPO = Path(__file__).resolve().parents[1]
LOCUST = str(Path(sys.executable).with_name("locust"))

DNSPERF = """\
# dnsperf -d queries.txt
www.example.com A
www.example.com aaaa
example.com MX

mail.example.com.   TXT
plain.example.com
"""

BIND_LOG = """\
29-Nov-2026 12:30:00.101 general: info: managed-keys-zone: loaded serial 2
29-Nov-2026 12:30:00.412 queries: info: client @0x7f3a2c0 192.0.2.7#53211 (www.example.com): query: www.example.com IN A +E(0)K (198.18.0.53)
29-Nov-2026 12:30:00.413 queries: info: client 192.0.2.8#40000: query: example.com IN MX + (198.18.0.53)
"""

UNBOUND_LOG = """\
[1764419400] unbound[812:0] notice: init module 0: validator
[1764419400] unbound[812:0] info: 127.0.0.1 www.example.com. A IN
[1764419400] unbound[812:0] info: 127.0.0.1 www.example.com. A IN NOERROR 0.000000 1 45
Nov 29 12:30:01 unbound[812:0] info: 192.0.2.9 example.com. AAAA IN
"""


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_dnsperf_query_file_gives_each_name_its_qtype(tmp_path: Path) -> None:
    queries = load_queries(_write(tmp_path, "queries.txt", DNSPERF))
    assert queries == [
        NameQuery("www.example.com", "A"), NameQuery("www.example.com", "AAAA"), NameQuery("example.com", "MX"),
        NameQuery("mail.example.com.", "TXT"), NameQuery("plain.example.com", None),
    ]
    # the names alone for callers that only want names (the same reader)
    assert wire.load_names(tmp_path / "queries.txt")[2] == "example.com"


def test_bind_and_unbound_query_logs_give_names_and_qtypes(tmp_path: Path) -> None:
    assert load_queries(_write(tmp_path, "query.log", BIND_LOG)) == [
        NameQuery("www.example.com", "A"), NameQuery("example.com", "MX")]
    # the start-up notice and the log-replies line are not queries
    assert load_queries(_write(tmp_path, "unbound.log", UNBOUND_LOG)) == [
        NameQuery("www.example.com.", "A"), NameQuery("example.com.", "AAAA")]


@pytest.mark.parametrize("name, text, where, what", [
    ("queries.txt", "www.example.com A\nexample.com BOGUS\n", "queries.txt line 2", "'example.com BOGUS'"),
    ("queries.txt", "a.example A\nb.example A extra\n", "queries.txt line 2", "dnsperf"),
    ("queries.txt", "# only\n" + "a" * 64 + ".example A\n", "queries.txt line 2", "not a valid DNS name"),
    ("query.log", BIND_LOG + "29-Nov-2026 12:30:01.000 queries: info: client 192.0.2.8#1: query: example.com IN NOPE +\n",
     "query.log line 4", "'NOPE'"),
    ("unbound.log", "[1] unbound[1:0] info: 127.0.0.1 bad..name. A IN\n", "unbound.log line 1", "'bad..name.'"),
    # a log without one query line is no log: read as a names file, its first line is refused
    ("quiet.log", "[1] unbound[1:0] notice: start of service\n", "quiet.log line 1", "not a valid DNS name"),
])
def test_malformed_query_files_name_file_and_line(tmp_path: Path, name, text, where, what) -> None:
    with pytest.raises(InputFileError) as err:
        load_queries(_write(tmp_path, name, text))
    msg = str(err.value)
    assert where in msg and what in msg and "\n" not in msg, msg


def test_query_pool_sends_each_pinned_pair_and_the_mix_for_bare_names() -> None:
    names = [("p1.example", "MX"), ("p2.example", "TXT"), "bare.example"]
    pool = wire.QueryPool(names, [("A", 1.0)], size=600, seed=4)
    assert pool.qtypes == ["A", "MX", "TXT"]
    seen = set()
    for q in pool.queries:
        msg = dns.message.from_wire(b"\x00\x00" + q.tail)
        question = msg.question[0]
        seen.add((question.name.to_text(), dns.rdatatype.to_text(question.rdtype), pool.qtypes[q.qtype_index]))
    assert seen == {("p1.example.", "MX", "MX"), ("p2.example.", "TXT", "TXT"), ("bare.example.", "A", "A")}


def test_imaptest_users_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "users.txt", "# imaptest userfile\nuser0001:pw1\n\nuser0002:pa:ss\n")
    assert read_accounts(path) == [("user0001", "pw1"), ("user0002", "pa:ss")]
    # the lab's CSV form still reads as before
    assert read_accounts(_write(tmp_path, "a.csv", "user,password\nu1,p1\n")) == [("u1", "p1")]


@pytest.mark.parametrize("text, where", [
    ("user0001:pw1\nuser0002\n", "line 2: expected 'user:password', got 'user0002' with no password"),
    ("user0001:pw1\nuser0002:\n", "line 2: expected 'user:password'"),
    ("user0001:pw1\n:secret\n", "line 2"),
    ("# nothing\n", "has no accounts"),
])
def test_malformed_users_file_names_the_line_and_never_the_password(tmp_path: Path, text, where) -> None:
    with pytest.raises(InputFileError) as err:
        read_accounts(_write(tmp_path, "users.txt", text))
    msg = str(err.value)
    assert "users.txt" in msg and where in msg and "\n" not in msg, msg
    assert "secret" not in msg


# ---------------------------------------------------------------------------------------------
# against the lab: short runs of the shipped locustfiles
# ---------------------------------------------------------------------------------------------

_LAB_QTYPE = (("v6-", "AAAA"), ("mx", "MX"), ("txt", "TXT"), ("h", "A"))


def _lab_dnsperf_file(lab, tmp_path: Path, n: int = 200) -> Path:
    """The lab's first ``n`` names in dnsperf form, each with the type it holds."""
    lines = ["# dnsperf query file: name qtype"]
    for name in Path(lab.names_file).read_text().split()[:n]:
        qtype = next(t for prefix, t in _LAB_QTYPE if name.startswith(prefix))
        lines.append(f"{name} {qtype}")
    return _write(tmp_path, "queries.txt", "\n".join(lines) + "\n")


def _run_locust(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([LOCUST, *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _stats(prefix: Path) -> dict[str, dict]:
    with open(f"{prefix}_stats.csv", newline="") as f:
        return {row["Name"]: row for row in csv.DictReader(f)}


@pytest.mark.lab
def test_a_dnsperf_query_file_drives_the_burst_locustfile(lab, tmp_path: Path) -> None:
    queries = _lab_dnsperf_file(lab, tmp_path)
    prefix = tmp_path / "dns"
    out = _run_locust(["-f", str(REPO / "locustfiles" / "dns_burst.py"), "--headless", "-t", "4s",
                       "--csv", str(prefix), "--host", str(lab.dns), "--dns-names-file", str(queries),
                       "--dns-rate", "300", "--dns-burst-size", "0"], tmp_path)
    assert out.returncode in (0, 1) and "Traceback" not in out.stderr, out.stderr[-2000:]
    rows = _stats(prefix)
    # one Locust row per qtype of the file: each line's own type was sent, and answered (the
    # mix alone, A:80,AAAA:20, would give no MX or TXT row)
    assert {"A", "AAAA", "MX", "TXT"} <= set(rows), sorted(rows)
    for qtype in ("A", "AAAA", "MX", "TXT"):
        assert int(rows[qtype]["Request Count"]) > 0
    total = rows["Aggregated"]
    assert int(total["Failure Count"]) < 0.05 * int(total["Request Count"])  # a loaded machine may time out a few


@pytest.mark.lab
def test_an_unbound_query_log_drives_the_flood_locustfile(lab, tmp_path: Path) -> None:
    names = Path(lab.names_file).read_text().split()
    log = "\n".join([f"[1764419400] unbound[812:0] notice: init module 0: validator"]
                    + [f"[1764419400] unbound[812:0] info: 127.0.0.1 {n}. MX IN" for n in names[:50]]) + "\n"
    path = _write(tmp_path, "unbound.log", log)
    prefix = tmp_path / "flood"
    out = _run_locust(["-f", str(REPO / "locustfiles" / "dns_flood.py"), "--headless", "-t", "4s",
                       "--csv", str(prefix), "--host", str(lab.dns), "--dns-names-file", str(path),
                       "--dns-sources", "20", "--dns-rate", "200", "--dns-random-subdomain-share", "0"], tmp_path)
    assert out.returncode in (0, 1) and "Traceback" not in out.stderr, out.stderr[-2000:]
    rows = _stats(prefix)
    assert int(rows["MX"]["Request Count"]) > 0  # the log's qtype, not the flood's A/AAAA mix
    assert not {"A", "AAAA"} & set(rows), sorted(rows)
    total = rows["Aggregated"]
    assert int(total["Failure Count"]) < 0.05 * int(total["Request Count"])


@pytest.mark.lab
def test_a_malformed_dnsperf_file_stops_the_locustfile_with_one_line(lab, tmp_path: Path) -> None:
    path = _write(tmp_path, "queries.txt", "h00000.lab.test A\nh00001.lab.test NOTATYPE\n")
    out = _run_locust(["-f", str(REPO / "locustfiles" / "dns_burst.py"), "--headless", "-t", "3s",
                       "--host", str(lab.dns), "--dns-names-file", str(path)], tmp_path)
    assert out.returncode == 2
    errors = [ln for ln in out.stderr.splitlines() if "loadkit: error:" in ln]
    assert len(errors) == 1 and "queries.txt line 2" in errors[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr


@pytest.mark.lab
def test_an_imaptest_users_file_drives_the_imap_storm(lab, tmp_path: Path) -> None:
    with open(lab.accounts_file, newline="") as f:
        accounts = [(r["user"], r["password"]) for r in csv.DictReader(f)][:30]
    users = _write(tmp_path, "users.txt", "".join(f"{u}:{p}\n" for u, p in accounts))
    host, port = lab.imap
    prefix = tmp_path / "imap"
    out = _run_locust(["-f", str(REPO / "locustfiles" / "imap_storm.py"), "--headless", "-u", "20", "-r", "20",
                       "-t", "5s", "--csv", str(prefix), "--host", f"{host}:{port}", "--mail-accounts", str(users),
                       "--mail-dwell", "1"], tmp_path)
    # a busy CI machine may time out a login or two (Locust then exits 1); a misread users file
    # cannot log in at all, and its failures are auth_rejected
    assert out.returncode in (0, 1) and "Traceback" not in out.stderr, out.stderr[-2000:]
    rows = _stats(prefix)
    login = rows["LOGIN"]
    assert int(login["Request Count"]) >= 20, rows.keys()
    assert int(login["Failure Count"]) < 0.2 * int(login["Request Count"]), login
    with open(f"{prefix}_failures.csv", newline="") as f:
        classes = {r["Error"] for r in csv.DictReader(f) if r["Name"] == "LOGIN"}
    assert "auth_rejected" not in classes, classes
