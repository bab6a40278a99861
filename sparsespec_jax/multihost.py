"""Multi-process batch generation: data parallel over the lines of one JSONL batch.

Every process (one per host on a TPU pod slice, or one per device group on a multi-GPU host) runs its own
engine on its own local devices, optionally tensor parallel within them, and serves the lines whose index
modulo the process count is its process index. It writes its results to a part file beside the output;
after a barrier process 0 folds all part files into the output, one record per request, in input order.
Requests never span processes, so processes exchange nothing but the barrier; the output's directory must
be shared by all of them (NFS, a mounted bucket, or the local disk of a single host).

Resume: an interrupted run leaves part files; the next run first folds them into the output (process 0,
before anyone starts) and then skips every id the output holds, whatever the process count was before.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Mapping

import jax

PART_SUFFIX = ".part-"


@dataclasses.dataclass(frozen=True)
class ProcessShare:
    """Which lines of the batch this process serves, and where it writes them."""

    process_id: int
    num_processes: int

    def __post_init__(self):
        if not 0 <= self.process_id < self.num_processes:
            raise ValueError(f"process_id {self.process_id} is outside [0, {self.num_processes})")

    def owns(self, line_index: int) -> bool:
        """True for the lines (0-based index in the input file) this process serves."""
        return line_index % self.num_processes == self.process_id

    def part_file(self, output: Path) -> Path:
        return output.with_name(f"{output.name}{PART_SUFFIX}{self.process_id:05d}")


def join_processes(coordinator: str | None, num_processes: int | None, process_id: int | None) -> ProcessShare:
    """Initialise jax.distributed (arguments left None are detected from the environment: Cloud TPU, SLURM,
    Open MPI, or JAX_COORDINATOR_ADDRESS) and return this process's share."""
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    return ProcessShare(jax.process_index(), jax.process_count())


def barrier(name: str) -> None:
    """Wait until every process has reached the barrier of the same name."""
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def part_files(output: Path) -> list[Path]:
    """Part files of `output` left by any process of any run, in process order."""
    return sorted(output.parent.glob(f"{output.name}{PART_SUFFIX}*"))


def _complete_records(path: Path) -> list[dict]:
    """The records of a JSONL results file; a torn last line (a crash mid-write) is left out."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "id" in record:
            records.append(record)
    return records


def merge_part_files(output: Path, first_line: Mapping[str, int]) -> int:
    """Fold every part file into `output`; returns how many records were added.

    Keeps one record per request (the first seen: the output's own, then the parts in process order) and
    writes them in input order: a result at the first input line of its id, an error record at its own line
    (a line repeating an id keeps its error beside the original's result); ids no longer in the input go last.
    The output is replaced atomically and the parts removed only afterwards, so an interruption at any point
    loses nothing and a repeated merge adds nothing twice.
    """
    parts = part_files(output)
    if not parts:
        return 0
    existing = _complete_records(output)
    merged, seen = [], set()
    for record in existing + [r for part in parts for r in _complete_records(part)]:
        key = (str(record["id"]), record.get("line") if "error" in record else None)
        if key not in seen:
            seen.add(key)
            merged.append(record)

    def input_position(record: dict) -> float:
        line = record.get("line") if "error" in record else first_line.get(str(record["id"]))
        return math.inf if line is None else line

    merged.sort(key=input_position)                     # stable: unknown ids keep their order, last
    staging = output.with_name(f".{output.name}.merging-{os.getpid()}")
    staging.write_text("".join(json.dumps(record) + "\n" for record in merged), encoding="utf-8")
    os.replace(staging, output)
    for part in parts:
        part.unlink()
    return len(merged) - len(existing)
