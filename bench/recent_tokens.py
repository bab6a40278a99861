"""Which recent window PillarAttn sets should keep (SpecConfig.recent_tokens), on the model's own reasoning.

The real model generates each request's context once (vanilla decoding from a chat-templated reasoning prompt,
T=0.6, EOS ignored: e2e.generated_contexts), then every configuration prefills those same contexts and runs a
steady-state window (`--warmup` + `--steps` steps, real acceptance): streaming first, as the reference, then
pillar with each `--recent` value. Reports tokens/s, tokens per step and accepted drafts per verify; writes
bench/results/<name>.{json,md}. No sync-mode or attention timing: use bench/e2e.py (`--recent-tokens N`) for
the full breakdown of one setting.

  python bench/recent_tokens.py --model PATH --context 7680 --recent 0 32 128 --name recent_tokens_h200
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from common import device_description, markdown_table, today, write_result
from sparsespec_jax.benchmark import e2e


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=e2e.DEFAULT_MODEL)
    parser.add_argument("--context", type=int, default=7680)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--recent", nargs="+", type=int, default=[0, 32, 128])
    parser.add_argument("--dtype", choices=sorted(e2e.DTYPES), default="bfloat16")
    parser.add_argument("--warmup", type=int, default=24)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--name", default="recent_tokens_h200")
    args = parser.parse_args()
    config = e2e.BenchConfig(workloads=("real",), methods=("pillar", "streaming"), model=args.model,
                             real_batch=(args.batch,), real_contexts=(args.context,),
                             real_context_source="generated", real_dtype=args.dtype, warmup=args.warmup,
                             steps=args.steps)
    model = e2e.load_real_model(config)
    prompt_ids = e2e.chat_token_ids(model.tokenizer, e2e.read_prompts(config.prompts), config.model)
    contexts, generation = e2e.generated_contexts(model, prompt_ids, args.batch, args.context, config)
    print(f"contexts: {generation['output_tokens']} tokens generated in {generation['seconds']:.0f} s", flush=True)
    points = []
    for method, recent in [("streaming", 0)] + [("pillar", r) for r in args.recent]:
        started = time.perf_counter()
        variant = dataclasses.replace(config, recent_tokens=recent)
        point = e2e.run_real_window(model, contexts, args.context, method, variant)
        points.append({"recent_tokens": recent, **point})
        print(f"{method} recent {recent}: {point['tokens_per_s']:.0f} tok/s, accepted/verify "
              f"{point['accepted_per_verify']:.2f} ({time.perf_counter() - started:.0f} s)", flush=True)
    rows = [[p["method"], p["recent_tokens"] if p["method"] == "pillar" else "-", f"{p['tokens_per_s']:.0f}",
             f"{p['tokens_per_step']:.2f}", f"{p['accepted_per_verify']:.2f}", f"{p['step_ms']:.2f}",
             f"{p['host_ms']:.2f}", p["acceptance_histogram"]] for p in points]
    markdown = (f"# PillarAttn recent window on the model's own reasoning\n\n{device_description()}, {today()}. "
                f"{model.name}, batch {args.batch}, context {args.context} (prompt and its vanilla continuation, "
                f"{generation['output_tokens']} tokens generated in {generation['seconds']:.0f} s), T=0.6, "
                f"{args.warmup} warm-up + {args.steps} timed steps per row.\n\n"
                + markdown_table(["method", "recent tokens", "tok/s", "tok/step", "accepted / verify", "step ms",
                                  "host ms", "accepted 0..k (verifies)"], rows))
    print(markdown)
    write_result(args.name, {"device": device_description(), "date": today(), "args": vars(args),
                             "generation": generation, "points": points}, markdown)


if __name__ == "__main__":
    main()
