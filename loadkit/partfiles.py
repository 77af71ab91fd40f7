"""Append-only Parquet tables written as numbered part files.

A table is a directory; each :meth:`PartWriter.flush` writes the buffered rows as one new part
file, first under a temporary name and then renamed, so a reader never sees a half-written part
and a crash loses at most the rows not yet flushed. DuckDB and pyarrow read the directory as one
table (``read_parquet('dir/*.parquet')``). Used by the collector and by run records alike.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq


class PartWriter:
    """Buffer rows (NamedTuples or dicts) and write them as ``part-NNNNNN.parquet`` files."""

    def __init__(self, folder: str | Path, columns: Iterable[str] | None = None) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._columns = list(columns) if columns is not None else None
        self._rows: list[Mapping[str, Any]] = []
        self._lock = threading.Lock()
        existing = sorted(self.folder.glob("part-*.parquet"))
        # continue numbering after a restart so earlier parts are never overwritten
        self._next = int(existing[-1].stem.split("-")[1]) + 1 if existing else 1
        self.rows_written = 0

    def append(self, row: NamedTuple | Mapping[str, Any]) -> None:
        with self._lock:
            self._rows.append(row._asdict() if hasattr(row, "_asdict") else dict(row))

    def extend(self, rows: Iterable[NamedTuple | Mapping[str, Any]]) -> None:
        with self._lock:
            self._rows.extend(r._asdict() if hasattr(r, "_asdict") else dict(r) for r in rows)

    def __len__(self) -> int:
        return len(self._rows)

    def flush(self) -> Path | None:
        """Write buffered rows as one part file; None when there was nothing to write."""
        with self._lock:
            rows, self._rows = self._rows, []
            if not rows:
                return None
            index = self._next
            self._next += 1
        columns = self._columns or list(rows[0].keys())
        for row in rows:  # rows may carry extra columns (e.g. *_delta): keep them all
            for key in row:
                if key not in columns:
                    columns.append(key)
        data = {c: [r.get(c) for r in rows] for c in columns}
        table = pa.table(data)
        path = self.folder / f"part-{index:06d}.parquet"
        tmp = path.with_suffix(".parquet.tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, path)
        self.rows_written += len(rows)
        return path
