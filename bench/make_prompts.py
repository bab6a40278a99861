"""Write reasoning prompts (reasoning-gym tasks, fixed seeds) to bench/data/reasoning_prompts.jsonl.

The file is committed so benchmark machines need neither reasoning-gym nor network access.
Run: .venv/bin/python bench/make_prompts.py   (needs `pip install -e '.[bench]'`)
"""

from __future__ import annotations

import json
from pathlib import Path

import reasoning_gym

TASKS = {"gsm_symbolic": 96, "basic_arithmetic": 16, "leg_counting": 16, "simple_equations": 16,
         "time_intervals": 16, "propositional_logic": 16, "number_sequence": 16, "word_sorting": 16}
SUFFIX = "\nThink step by step, then give the final answer."
OUT = Path(__file__).parent / "data" / "reasoning_prompts.jsonl"


def main() -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with OUT.open("w", encoding="utf-8") as sink:
        for task, size in TASKS.items():
            for index, item in enumerate(reasoning_gym.create_dataset(task, size=size, seed=2026)):
                record = {"id": f"{task}-{index}", "prompt": item["question"] + SUFFIX}
                sink.write(json.dumps(record) + "\n")
    print(f"wrote {sum(TASKS.values())} prompts to {OUT}")


if __name__ == "__main__":
    main()
