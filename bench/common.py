"""Shared pieces of the benchmark scripts: prompts, device description, result files."""

from __future__ import annotations

import datetime
import json
import platform
from pathlib import Path

import jax

DATA = Path(__file__).parent / "data" / "reasoning_prompts.jsonl"
RESULTS = Path(__file__).parent / "results"


def reasoning_prompts(count: int) -> list[str]:
    """The first `count` committed reasoning-gym prompts (gsm_symbolic first, then other tasks)."""
    prompts = [json.loads(line)["prompt"] for line in DATA.read_text(encoding="utf-8").splitlines()]
    if count > len(prompts):
        raise ValueError(f"asked for {count} prompts, {DATA} holds {len(prompts)}")
    return prompts[:count]


def device_description() -> str:
    device = jax.devices()[0]
    kind = getattr(device, "device_kind", device.platform)
    return f"{kind} ({device.platform}, jax {jax.__version__}, {platform.machine()})"


def today() -> str:
    return datetime.date.today().isoformat()


def write_result(name: str, payload: dict, markdown: str) -> Path:
    """Save a run as bench/results/<name>.json and .md; returns the markdown path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=1) + "\n")
    path = RESULTS / f"{name}.md"
    path.write_text(markdown)
    return path


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"

