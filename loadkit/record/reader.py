"""Read a run directory back as typed tables.

Models and reports start here: :func:`load_run` gives a :class:`RunData` with one pandas
DataFrame per table of :data:`loadkit.schema.RUN_LAYOUT` (empty, with the record's columns,
when the run has none) and the manifest. A part file cut short by a crash is skipped with a
warning; everything flushed before it is returned.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from loadkit.errors import RecordError
from loadkit.record.writer import record_complete
from loadkit.schema import RUN_LAYOUT, TABLE_RECORDS

log = logging.getLogger(__name__)


@dataclass
class RunData:
    """One run directory, loaded."""

    path: Path
    manifest: dict
    requests: pd.DataFrame
    failures: pd.DataFrame
    generator: pd.DataFrame
    groups: pd.DataFrame
    net: pd.DataFrame
    sockets: pd.DataFrame
    system: pd.DataFrame
    #: LatencyBucket rows; empty for runs recorded before the table existed
    latency: pd.DataFrame = field(default_factory=pd.DataFrame)
    #: FirewallSample rows; empty when the target had no firewall table (or older runs)
    firewall: pd.DataFrame = field(default_factory=pd.DataFrame)
    events: list[dict] = field(default_factory=list)

    @property
    def run_id(self) -> str:
        return str(self.manifest.get("run_id", self.path.name))

    @property
    def complete(self) -> bool:
        """True when the process that recorded the run closed it (not killed mid-run)."""
        return record_complete(self.manifest)


def read_table(run_dir: Path, table: str) -> pd.DataFrame:
    """All part files of ``table`` in ``run_dir`` as one DataFrame, in part order."""
    record = TABLE_RECORDS[table]
    folder = Path(run_dir) / RUN_LAYOUT[table]
    frames = []
    if folder.is_dir():
        for part in sorted(folder.glob("*.parquet")):
            try:
                frames.append(pq.read_table(part).to_pandas())
            except Exception as err:  # a part cut short by SIGKILL: keep the others
                log.warning("skipping unreadable part %s: %s", part, err)
    if not frames:
        return pd.DataFrame({name: pd.Series(dtype="float64") for name in record._fields})
    return pd.concat(frames, ignore_index=True)


def read_events(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / RUN_LAYOUT["events"]
    events: list[dict] = []
    if not path.exists():
        return events
    with path.open() as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                # the last line may be half-written after a kill; anything else is worth a word
                log.warning("%s line %d is not JSON; skipped", path, lineno)
    return events


def load_manifest(run_dir: Path) -> dict:
    path = Path(run_dir) / RUN_LAYOUT["manifest"]
    if not Path(run_dir).is_dir():
        raise RecordError(f"run directory {run_dir} does not exist")
    if not path.exists():
        raise RecordError(f"run directory {run_dir} has no {RUN_LAYOUT['manifest']}: not a loadkit run")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise RecordError(f"{path} is not valid JSON ({err.msg} at line {err.lineno})") from err


def load_run(run_dir: str | Path) -> RunData:
    """Load every table of a run directory; :class:`RecordError` if it is not a run."""
    run_dir = Path(run_dir)
    manifest = load_manifest(run_dir)
    tables = {name: read_table(run_dir, name) for name in TABLE_RECORDS}
    return RunData(path=run_dir, manifest=manifest, events=read_events(run_dir), **tables)
