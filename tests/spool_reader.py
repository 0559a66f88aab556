"""Reading a spool directory back, for tests that use a spool:// sink."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from collector.schema import from_ipc, table_of


def read_spool(directory: Path) -> dict[str, pa.Table]:
    """Every batch in a spool directory, per table: the bytes a sink would have shipped."""
    tables: dict[str, list[pa.RecordBatch]] = {}
    for path in sorted(Path(directory).glob("*.arrow")):
        for batch in from_ipc(path.read_bytes()):
            tables.setdefault(table_of(batch), []).append(batch)
    return {name: pa.Table.from_batches(batches) for name, batches in tables.items()}
