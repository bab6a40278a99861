"""JSON-lines input of the benchmark tools (prompt files, step profiles), read with errors that name file and line."""

from __future__ import annotations

import json
from pathlib import Path


def read_jsonl(path: Path) -> list[tuple[int, object]]:
    """(1-based line number, parsed value) of every non-blank line; a line that is not JSON raises ValueError
    naming the file and the line."""
    records = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: invalid JSON ({err.msg})") from None
    return records
