"""Write one run directory as the run goes (layout: :data:`loadkit.schema.RUN_LAYOUT`).

:class:`RunWriter` owns the tables (Parquet part files), ``events.jsonl`` and ``manifest.json``.
Rows are buffered and :meth:`RunWriter.flush` writes one part file per table that has rows,
atomically, so after a SIGKILL everything up to the last flush is readable with
:func:`loadkit.record.reader.load_run`. Each event line is written and flushed at once. The
manifest is rewritten atomically (temporary file + rename) at start, on :meth:`finish` and
whenever the runner adds gate results.

A ``status.json`` beside the manifest holds the latest live figures (elapsed, requests,
failures by class, target memory) for the runner's status line; it is not part of the record.

**Complete or not.** Only the process that records the run writes the manifest's end time, at its
clean stop (:meth:`RunWriter.finish`). A record whose writer was killed keeps ``ended_unix_s`` at 0:
while ``running``, and also after the runner has closed it on the dead writer's behalf
(``finish(status, complete=False)``). :func:`record_complete` is the one test of that; ``loadkit
runs show`` marks such a run incomplete and the report refuses it.

**Storage failures.** A write that fails (the disk filled up, the directory became read-only)
raises :class:`~loadkit.errors.RecordError` with one line naming the run and the file; what was
written before stays intact and readable (a part file is renamed into place only once complete,
and a half-written temporary part is removed to give the space back).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple

from loadkit.errors import RecordError
from loadkit.partfiles import PartWriter
from loadkit.schema import (
    RUN_LAYOUT,
    TABLE_RECORDS,
    Event,
    RunManifest,
)

#: record type -> table name in RUN_LAYOUT
_TABLE_OF: dict[type, str] = {record: table for table, record in TABLE_RECORDS.items()}

STATUS_FILE = "status.json"
#: left in the run directory by the runner before it stops Locust with SIGTERM, so the record's
#: final status is ``interrupted`` rather than ``completed``
INTERRUPT_MARKER = ".interrupted"


def new_run_id(scenario: str, now_unix_s: float | None = None) -> str:
    """``20261125T204912-smoke-3f9a``: sortable by time, readable, unique enough."""
    now = time.time() if now_unix_s is None else now_unix_s
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
    return f"{stamp}-{scenario}-{os.urandom(2).hex()}"


def versions() -> dict[str, str]:
    from loadkit import __version__

    try:  # from the package metadata: importing Locust would monkey-patch this process
        locust_version = importlib.metadata.version("locust")
    except importlib.metadata.PackageNotFoundError:
        locust_version = ""
    return {
        "loadkit": __version__,
        "locust": locust_version,
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def host_facts() -> dict[str, Any]:
    try:
        import psutil

        mem = int(psutil.virtual_memory().total)
    except Exception:
        mem = 0
    return {"hostname": socket.gethostname(), "cpus": os.cpu_count() or 0, "mem_total_bytes": mem}


def record_complete(manifest: dict[str, Any]) -> bool:
    """Did the process that recorded this run close it (final status and end time written)?

    False while it runs and after it was killed, also when the runner then set a final status
    (``failed``, ``interrupted``) for it: the record ends at its last flushed interval."""
    return manifest.get("status") not in (None, "running") and bool(manifest.get("ended_unix_s"))


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` whole or not at all: a reader sees the old file or the
    new one, never half of one. The temporary name is per process and thread, so two writers of
    one file (the lab and its supervisor share a state file) never rename each other's half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # cut short (a full disk): the previous file stays as it was
        raise


class RunWriter:
    """One run directory, written incrementally. Thread-safe for appends and events."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / RUN_LAYOUT["locust"]).mkdir(exist_ok=True)
        self._tables: dict[str, PartWriter] = {}
        self._events_lock = threading.Lock()
        self.manifest_path = self.run_dir / RUN_LAYOUT["manifest"]
        self.events_path = self.run_dir / RUN_LAYOUT["events"]

    # -- tables ----------------------------------------------------------------------------------
    def table(self, name: str) -> PartWriter:
        if name not in self._tables:
            record = TABLE_RECORDS.get(name)
            columns = record._fields if record is not None else None
            self._tables[name] = PartWriter(self.run_dir / RUN_LAYOUT[name], columns)
        return self._tables[name]

    def add(self, row: NamedTuple) -> None:
        """Buffer a record (RequestInterval, GroupSample, ...) or write an :class:`Event`."""
        if isinstance(row, Event):
            self.event(row.kind, row.source, row.detail, row.ts_unix_s)
            return
        self.table(_TABLE_OF[type(row)]).append(row)

    def add_many(self, rows: Iterable[NamedTuple]) -> None:
        for row in rows:
            self.add(row)

    def add_row(self, table: str, row: dict[str, Any]) -> None:
        """A row with extra columns (e.g. the ``*_delta`` columns of ``net``)."""
        self.table(table).append(row)

    def flush(self) -> None:
        for writer in list(self._tables.values()):
            with self._storage(writer.folder):
                try:
                    writer.flush()
                except OSError:
                    # a part cut short by a full disk: give its space back (readers never see it)
                    for tmp in writer.folder.glob("*.parquet.tmp"):
                        tmp.unlink(missing_ok=True)
                    raise

    @contextlib.contextmanager
    def _storage(self, path: Path) -> Iterator[None]:
        """Map a failed write (disk full, read-only, gone) to one line naming the run and file."""
        try:
            yield
        except OSError as err:
            # pyarrow's OSError has the errno but its own wording ("Error writing bytes...")
            why = os.strerror(err.errno) if err.errno else (str(err) or type(err).__name__)
            try:
                where = path.relative_to(self.run_dir)
            except ValueError:
                where = path
            raise RecordError(
                f"run record {self.run_dir}: cannot write {where} ({why}); everything written "
                "before is kept and readable"
            ) from err

    # -- events ----------------------------------------------------------------------------------
    def event(self, kind: str, source: str, detail: dict | None = None, ts_unix_s: float | None = None) -> Event:
        ev = Event(time.time() if ts_unix_s is None else ts_unix_s, kind, source, dict(detail or {}))
        line = json.dumps(ev._asdict(), default=str)
        with self._storage(self.events_path), self._events_lock, self.events_path.open("a") as fh:
            fh.write(line + "\n")
            fh.flush()
        return ev

    # -- manifest --------------------------------------------------------------------------------
    def read_manifest(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.manifest_path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def write_manifest(self, manifest: RunManifest | dict[str, Any]) -> dict[str, Any]:
        data = manifest._asdict() if isinstance(manifest, RunManifest) else dict(manifest)
        with self._storage(self.manifest_path):
            write_json_atomic(self.manifest_path, data)
        return data

    def update_manifest(self, **fields: Any) -> dict[str, Any]:
        data = self.read_manifest() or {}
        unknown = set(fields) - set(RunManifest._fields)
        if unknown:
            raise KeyError(f"not manifest fields: {sorted(unknown)}")
        data.update(fields)
        return self.write_manifest(data)

    def start(
        self,
        run_id: str,
        scenario: str,
        release: str,
        profile: dict | None = None,
        targets: list | None = None,
        lab: dict | None = None,
        started_unix_s: float | None = None,
    ) -> dict[str, Any]:
        """Write the manifest with status ``running`` (keeping what an earlier writer put there)."""
        previous = self.read_manifest() or {}
        manifest = RunManifest(
            run_id=run_id,
            scenario=scenario,
            release=release,
            status="running",
            started_unix_s=started_unix_s or previous.get("started_unix_s") or time.time(),
            ended_unix_s=0.0,
            profile=profile if profile is not None else previous.get("profile", {}),
            targets=targets if targets is not None else previous.get("targets", []),
            versions=versions(),
            host=host_facts(),
            lab=lab if lab is not None else previous.get("lab", {}),
            gates=previous.get("gates", []),
        )
        return self.write_manifest(manifest)

    def finish(self, status: str, ended_unix_s: float | None = None, complete: bool = True) -> dict[str, Any]:
        """Flush every table and rewrite the manifest with its final status and end time.

        ``complete=False`` closes a record on behalf of a writer that died (the runner, after
        Locust was killed): the status is final but no end time is written, so the record stays
        marked incomplete (:func:`record_complete`)."""
        self.flush()
        if not complete:
            return self.update_manifest(status=status, ended_unix_s=0.0)
        return self.update_manifest(status=status, ended_unix_s=ended_unix_s or time.time())

    # -- live status (not part of the record) ----------------------------------------------------
    def write_status(self, status: dict[str, Any]) -> None:
        with self._storage(self.run_dir / STATUS_FILE):
            write_json_atomic(self.run_dir / STATUS_FILE, status)
