"""The benchmark's report: targets checked, a markdown summary, PNG plots and the full JSON, side by side.

Targets are printed as PASS, MISS or N/A (not measured by this run, with the reason); a miss is never hidden.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

METHOD_LABELS = {"none": "vanilla", "ngram": "n-gram", "streaming": "streaming", "pillar": "pillar"}
TARGET_SHAPE = "qwen3-8b-shaped"
SHAPED_SPEEDUP = 2.2            # pillar over vanilla, qwen3-8b-shaped, integrated over the output length
REAL_SPEEDUP = 1.5              # pillar over vanilla, real SmolLM2
HOST_MS = 0.5                   # host time per step, every point
ROOFLINE = 0.70                 # vanilla, fraction of the copy-bandwidth roofline, shaped points
PLOTS = ("throughput_vs_batch", "tokens_vs_output_length", "acceptance_histogram", "step_breakdown")


def point_label(point: dict) -> str:
    where = f"L{point['context']}" if "context" in point else f"+{point['new_tokens']}"
    return f"{point['workload']} B{point['batch']} {where}"


def _key(point: dict) -> tuple:
    return point["workload"], point["batch"], point.get("context", point.get("new_tokens"))


def by_point(points: list[dict]) -> dict[tuple, dict[str, dict]]:
    """{(workload, batch, context or new tokens): {method: point}} in run order."""
    grouped: dict[tuple, dict[str, dict]] = {}
    for point in points:
        grouped.setdefault(_key(point), {})[point["method"]] = point
    return grouped


def speedups(result: dict) -> list[dict]:
    """Pillar's tokens/s over each other method at every point where both ran."""
    rows = []
    for methods in by_point(result["points"]).values():
        if "pillar" not in methods:
            continue
        pillar = methods["pillar"]["tokens_per_s"]
        rows.append({"point": point_label(methods["pillar"]),
                     **{f"over_{m}": pillar / p["tokens_per_s"] for m, p in methods.items()
                        if m != "pillar" and p["tokens_per_s"] > 0}})
    return rows


def integrated_speedups(result: dict) -> list[dict]:
    """Pillar over the others on the integrated (output length) rates of the shaped workload."""
    curves = {(c["method"], c["batch"]): c for c in result.get("integrated", [])}
    rows = []
    for (method, batch), pillar in curves.items():
        if method != "pillar":
            continue
        for i, at in enumerate(pillar["points"]):
            row = {"batch": batch, "output_length": at["output_length"], "extrapolated": at["extrapolated"]}
            for other in ("none", "ngram", "streaming"):
                if (other, batch) in curves:
                    row[f"over_{other}"] = at["tokens_per_s"] / curves[other, batch]["points"][i]["tokens_per_s"]
            rows.append(row)
    return rows


def _target(name: str, status: str, value, detail: str) -> dict:
    return {"target": name, "status": status, "value": value, "detail": detail}


def check_targets(result: dict) -> list[dict]:
    """Every target as PASS / MISS / N/A with the measured value and where it came from."""
    targets = []
    shaped = result["workloads"].get("shaped")
    name = f"pillar >= {SHAPED_SPEEDUP}x vanilla ({TARGET_SHAPE}, integrated over the output length)"
    rows = [r for r in integrated_speedups(result) if "over_none" in r]
    if not rows:
        targets.append(_target(name, "N/A", None, "no shaped pillar and vanilla points"))
    elif shaped["shape"] != TARGET_SHAPE:
        targets.append(_target(name, "N/A", None, f"this run's shape is {shaped['shape']}"))
    else:
        longest = max(r["output_length"] for r in rows)
        at = [r for r in rows if r["output_length"] == longest]
        worst = min(at, key=lambda r: r["over_none"])
        targets.append(_target(name, "PASS" if worst["over_none"] >= SHAPED_SPEEDUP else "MISS", worst["over_none"],
                               f"output {longest} tokens after a {result['config']['prompt_length']}-token prompt, "
                               f"B{worst['batch']}" + (" (extrapolated beyond the measured contexts)"
                                                       if worst["extrapolated"] else "")))

    real = result["workloads"].get("real")
    name = f"pillar >= {REAL_SPEEDUP}x vanilla (real SmolLM2)"
    ratios = [(r["over_none"], r["point"]) for r in speedups(result)
              if r["point"].startswith("real") and "over_none" in r]
    if not ratios:
        targets.append(_target(name, "N/A", None, "no real pillar and vanilla points"))
    elif real["random_weights"] or "smollm2" not in str(result["config"]["model"]).lower():
        targets.append(_target(name, "N/A", None, f"this run's real model is {real['model']}"))
    else:
        worst, where = min(ratios)
        targets.append(_target(name, "PASS" if worst >= REAL_SPEEDUP else "MISS", worst, f"lowest at {where}"))

    name = "pillar above n-gram and streaming at every point"
    pairs = [(r[f"over_{m}"], f"{r['point']} vs {METHOD_LABELS[m]}") for r in speedups(result)
             for m in ("ngram", "streaming") if f"over_{m}" in r]
    if not pairs:
        targets.append(_target(name, "N/A", None, "no point with pillar and a baseline"))
    else:
        worst, where = min(pairs)
        below = [w for ratio, w in pairs if ratio <= 1]
        targets.append(_target(name, "MISS" if below else "PASS", worst,
                               f"lowest ratio at {where}" + (f"; not above at: {', '.join(below)}" if below else "")))

    name = f"host <= {HOST_MS} ms/step (throughput windows, every point)"
    if not result["points"]:
        targets.append(_target(name, "N/A", None, "no points"))
    else:
        worst = max(result["points"], key=lambda p: p["host_ms"])
        targets.append(_target(name, "PASS" if worst["host_ms"] <= HOST_MS else "MISS", worst["host_ms"],
                               f"highest at {point_label(worst)} {METHOD_LABELS[worst['method']]}"))

    name = f"vanilla >= {ROOFLINE:.0%} of the copy-bandwidth roofline (shaped points)"
    vanilla = [p for p in result["points"] if p["workload"] == "shaped" and p["method"] == "none"]
    if not vanilla:
        targets.append(_target(name, "N/A", None, "no shaped vanilla points"))
    else:
        worst = min(vanilla, key=lambda p: p["roofline_fraction"])
        targets.append(_target(name, "PASS" if worst["roofline_fraction"] >= ROOFLINE else "MISS",
                               worst["roofline_fraction"], f"lowest at {point_label(worst)}"))
    return targets


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows)]


POINT_HEADER = ["point", "method", "tok/s", "e2e tok/s", "x vanilla", "tok/step", "acc/verify", "host ms",
                "dispatch ms", "step ms", "device ms", "attention ms", "GEMM/other ms", "roofline ms", "% roofline",
                "mem GiB (in use / peak)", "KV tokens", "compile steps (s)", "evictions"]


def point_rows(result: dict) -> list[list]:
    rows = []
    for methods in by_point(result["points"]).values():
        base = methods.get("none")
        for method, p in methods.items():
            memory = p["device_memory"]
            rows.append([point_label(p), METHOD_LABELS[method], f"{p['tokens_per_s']:.1f}",
                         f"{p['tokens_per_s_e2e']:.1f}" if "tokens_per_s_e2e" in p else "-",
                         f"{p['tokens_per_s'] / base['tokens_per_s']:.2f}" if base else "-",
                         _fmt(p["tokens_per_step"]), _fmt(p["accepted_per_verify"]), _fmt(p["host_ms"]),
                         _fmt(p["dispatch_ms"]), _fmt(p["step_ms"]), _fmt(p["device_ms"]), _fmt(p["attention_ms"]),
                         _fmt(p["gemm_other_ms"]),
                         _fmt(p["roofline_ms"]), f"{p['roofline_fraction']:.0%}",
                         " / ".join("-" if memory[name] is None else f"{memory[name] / 2 ** 30:.1f}"
                                    for name in ("bytes_in_use", "peak_bytes_in_use")),
                         f"{p['kv_tokens_used_mean']:.0f}",
                         f"{p['compile_steps']} ({p['compile_s']:.1f})", p["preemptions"] + p["offloads"]])
    return rows


def integrated_rows(result: dict) -> tuple[list[str], list[list]]:
    curves = result.get("integrated", [])
    if not curves:
        return [], []
    lengths = [at["output_length"] for at in curves[0]["points"]]
    header = ["method", "batch", *(f"T={length}" for length in lengths)]
    rows = [[METHOD_LABELS[c["method"]], c["batch"],
             *(f"{at['tokens_per_s']:.1f}{'*' if at['extrapolated'] else ''}" for at in c["points"])] for c in curves]
    by_batch: dict[int, dict[int, float]] = {}
    for r in integrated_speedups(result):
        if "over_none" in r:
            by_batch.setdefault(r["batch"], {})[r["output_length"]] = r["over_none"]
    rows += [["pillar / vanilla", batch, *(f"{ratios[length]:.2f}x" for length in lengths)]
             for batch, ratios in by_batch.items()]
    return header, rows


def markdown(result: dict, targets: list[dict]) -> str:
    config = result["config"]
    layers = "unrolled" if config.get("unroll_layers") else "in a loop"
    burst_steps = result.get("burst_steps", config.get("burst_steps") or 1)
    lines = [f"# {result['title']}", "",
             f"{result['device']}, {result['date']}. Command: `{result['command']}`. Attention backend: "
             f"{result['attention_backend']}, decoder layers {layers}, row buckets of at least "
             f"{config.get('min_batch_bucket', 8)} ({config.get('row_buckets_per_doubling', 1)} sizes per power of two "
             f"above 64 tokens)"
             + (f", draft methods decoding plainly below {config['draft_min_context']} tokens of context"
                if config.get("draft_min_context") else "")
             + (f", pillar keeping the newest {config['recent_tokens']} tokens in every draft set"
                if config.get("recent_tokens") else "")
             + (f", {burst_steps} decode steps per device call in steady state (n-gram and the sync-mode "
                f"windows: 1)" if burst_steps > 1 else ", one decode step per device call")
             + ". Copy bandwidth (jitted x*2 over "
             f"{result['copy_bandwidth']['array_bytes'] / 2 ** 20:.0f} MiB, 2 x bytes / median time): "
             f"{result['copy_bandwidth']['bytes_per_s'] / 1e9:.1f} GB/s. Run time {result['elapsed_s']:.0f} s.", ""]
    if result.get("resumed"):
        lines[-1:] = ["Resumed into this report (the copy bandwidth above serves every point): " + "; ".join(
            f"{run['date']}, `{run['command']}`, after {run['points_kept']} points" for run in result["resumed"])
            + ".", ""]
    real, shaped = result["workloads"].get("real"), result["workloads"].get("shaped")
    if real and real.get("contexts"):
        generation = real.get("context_generation")
        if generation:
            filled = (f"the model's own reasoning: request i's chat-templated prompt i from {real['prompts']} and "
                      f"its vanilla continuation (generated once at batch {generation['batch']} to "
                      f"{generation['length']} tokens, {generation['output_tokens']} tokens in "
                      f"{generation['seconds']:.0f} s, then cut to L)")
            continued = "its own reasoning, as the whole generation continues at that length"
        else:
            filled = (f"chat-templated prompts from {real['prompts']} back to back (request i starting at "
                      "prompt i)")
            continued = "text the model continues after that context rather than its own reasoning"
        lines += [f"- real: {real['model']} ({real['dtype']}{', RANDOM weights' if real['random_weights'] else ''}), "
                  f"steady-state windows: each request's context filled to L tokens by prefilling {filled}; "
                  f"{real['fill_tokens']} tokens prefilled per step, so requests that finish their prefill first "
                  "decode while the rest still prefill: mean context at the window's start, per point: "
                  + ", ".join(f"{point_label(p)} {p['method']} {p['context_mean_at_start']:.0f}"
                              for p in result["points"] if "context_mean_at_start" in p)
                  + "; then "
                  f"{real['warmup']} warm-up + {real['steps']} timed steps at T={real['temperature']}, seeds "
                  f"{config['seed']}.., EOS ignored (compile steps left out); acceptance verified for real, on "
                  f"{continued}."]
    elif real:
        lines += [f"- real: {real['model']} ({real['dtype']}{', RANDOM weights' if real['random_weights'] else ''}), "
                  f"chat-templated prompts from {real['prompts']} ({real['distinct_prompts']} distinct, reused in "
                  f"order past that), T={real['temperature']}, seeds {config['seed']}.., EOS ignored, "
                  f"{real['new_tokens']} new tokens per request; acceptance verified for real. tok/s = output "
                  "tokens over engine time with compile steps (a new batch shape) counted at the median step; "
                  "e2e tok/s counts them as they were."]
    if shaped:
        groups: dict[str, list[str]] = {}
        for method, described in shaped["replay"].items():
            if described["distribution"] is not None:
                groups.setdefault(f"{described['distribution']} ({described['source']})", []).append(
                    METHOD_LABELS[method])
        replay = "; ".join(f"{', '.join(methods)}: {source}" for source, methods in groups.items())
        lines += [f"- shaped: {shaped['shape']} with RANDOM bf16 weights, batch placed at each context with random "
                  f"KV (no prefill), {shaped['warmup']} warm-up + {shaped['steps']} timed steps per point (compile "
                  f"steps left out). Acceptance is REPLAYED, not computed (accepted drafts 0..k drawn from: "
                  f"{replay}; capped by the drafts a row has)."]
        if "ngram" in shaped["replay"]:
            lines += ["- shaped n-gram: it proposes continuations of earlier occurrences in the request's own tokens, "
                      "which are random here, so it rarely has drafts to verify (its acc/verify shows how often)."]
    lines += ["- host ms: the engine's own time per step, not waiting for the device (in async mode it overlaps "
              "the device's); dispatch ms: the part of it spent inside the jitted step's call.",
              "- device ms: median wait of a sync-mode engine's steps (the host blocks right after dispatching "
              f"each step; {config['sync_steps']} steps after a k+2-step warm-up for shaped points and real "
              f"windows, the decode steps of a {config['sync_tokens']}-token generation for whole real "
              "generations). attention ms: the step's "
              "attention dispatches alone (all layers, random queries) at that window's mean composition; pillar "
              "includes its score pass. GEMM/other = device - attention.",
              "- roofline: bytes per step = weights (decoder layers once, output head once per logits pass) + KV "
              "read (verify/decode rows: full context; sparse draft rows: their token set; pillar verify rows: K "
              "again for scores) + KV written, at the throughput window's mean composition; % roofline = (bytes / "
              "copy bandwidth) / step ms.",
              "- mem: device memory in use at the end of the throughput window (its engine alive) and the "
              "process's peak so far (- where the platform keeps no statistics)."]
    if result["device"].startswith("cpu"):
        lines += ["- on a CPU, XLA may run a step inside its dispatch call: the sync wait then understates device "
                  "time, and roofline fractions against a cache-sized copy mean little."]
    lines += [""]
    lines += ["## Targets", ""]
    lines += [f"- **{t['status']}** {t['target']}: {_fmt(t['value'])} ({t['detail']})" for t in targets]
    lines += ["", "## Headline ratios (pillar tok/s over each method)", ""]
    ratio_rows = [[r["point"], *(f"{r[f'over_{m}']:.2f}x" if f"over_{m}" in r else "-"
                                 for m in ("none", "ngram", "streaming"))] for r in speedups(result)]
    lines += _table(["point", "vs vanilla", "vs n-gram", "vs streaming"], ratio_rows)
    header, rows = integrated_rows(result)
    if rows:
        lines += ["", f"## Shaped: tokens/s integrated over the output length (prompt {config['prompt_length']})", "",
                  "Output of T tokens after the prompt: mean ms/token = (1/T) x integral of the per-token time "
                  "(step ms / tokens per step) over contexts P..P+T, piecewise linear between the measured "
                  "contexts and extended linearly beyond them (* = extrapolated; a side whose extension would "
                  "turn negative is held at its end value instead). Assumes the whole batch sits at the same "
                  "context.", ""]
        lines += _table(header, rows)
    if result["skipped"]:
        lines += ["", f"Skipped (time budget): {', '.join(result['skipped'])}"]
    for failure in result["failed"]:
        lines += ["", f"FAILED {failure['point']}: {failure['error']}"]
    lines += ["", "## Per point", ""]
    lines += _table(POINT_HEADER, point_rows(result))
    return "\n".join(lines) + "\n"


# -- plots ---------------------------------------------------------------------------------------------------
def plot_all(result: dict, directory: Path, stem: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for name, draw in (("throughput_vs_batch", _plot_batches), ("tokens_vs_output_length", _plot_lengths),
                       ("acceptance_histogram", _plot_acceptance), ("step_breakdown", _plot_breakdown)):
        figure = draw(plt, result)
        path = directory / f"{stem}_{name}.png"
        figure.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(figure)
        paths.append(path)
    return paths


def _plot_batches(plt, result: dict):
    workloads = [w for w in ("real", "shaped") if any(p["workload"] == w for p in result["points"])] or ["real"]
    figure, axes = plt.subplots(1, len(workloads), figsize=(6 * len(workloads), 4), squeeze=False)
    for axis, workload in zip(axes[0], workloads):
        points = [p for p in result["points"] if p["workload"] == workload]
        series: dict[str, list] = {}
        for p in points:
            label = METHOD_LABELS[p["method"]] + (f" L{p['context']}" if "context" in p else "")
            series.setdefault(label, []).append((p["batch"], p["tokens_per_s"]))
        for label, xy in series.items():
            xy.sort()
            axis.plot([x for x, _ in xy], [y for _, y in xy], marker="o", label=label)
        axis.set(title=f"{workload}: output tokens/s vs batch", xlabel="batch", ylabel="tokens/s")
        if series:
            axis.legend(fontsize=7)
    return figure


def _plot_lengths(plt, result: dict):
    figure, axis = plt.subplots(figsize=(6, 4))
    for curve in result.get("integrated", []):
        xs = [at["output_length"] for at in curve["points"]]
        axis.plot(xs, [at["tokens_per_s"] for at in curve["points"]], marker="o",
                  label=f"{METHOD_LABELS[curve['method']]} B{curve['batch']}")
    axis.set(title=f"shaped: tokens/s integrated over the output (prompt {result['config']['prompt_length']})",
             xlabel="output length (tokens)", ylabel="tokens/s")
    if result.get("integrated"):
        axis.set_xscale("log", base=2)
        axis.legend(fontsize=7)
    return figure


def _plot_acceptance(plt, result: dict):
    workloads = [w for w in ("real", "shaped") if any(p["workload"] == w and p["verifies"] for p in result["points"])]
    workloads = workloads or ["real"]
    figure, axes = plt.subplots(1, len(workloads), figsize=(6 * len(workloads), 4), squeeze=False)
    for axis, workload in zip(axes[0], workloads):
        totals: dict[str, list[int]] = {}
        for p in result["points"]:
            if p["workload"] == workload and p["verifies"]:
                counts = totals.setdefault(p["method"], [0] * len(p["acceptance_histogram"]))
                totals[p["method"]] = [a + b for a, b in zip(counts, p["acceptance_histogram"])]
        width = 0.8 / max(1, len(totals))
        for i, (method, counts) in enumerate(totals.items()):
            share = [c / sum(counts) for c in counts]
            axis.bar([x + i * width for x in range(len(counts))], share, width, label=METHOD_LABELS[method])
        replayed = " (REPLAYED)" if workload == "shaped" else ""
        axis.set(title=f"{workload}{replayed}: verifies by drafts accepted", xlabel="drafts accepted",
                 ylabel="share of verifies")
        if totals:
            axis.legend(fontsize=7)
    return figure


def _plot_breakdown(plt, result: dict):
    points = result["points"]
    figure, axis = plt.subplots(figsize=(max(6, 0.6 * len(points) + 2), 4.5))
    labels = [f"{point_label(p)}\n{METHOD_LABELS[p['method']]}" for p in points]
    xs = range(len(points))
    attention = [max(0.0, p["attention_ms"]) for p in points]
    other = [max(0.0, p["gemm_other_ms"]) for p in points]
    axis.bar([x - 0.2 for x in xs], attention, 0.4, label="attention")
    axis.bar([x - 0.2 for x in xs], other, 0.4, bottom=attention, label="GEMM / other")
    axis.bar([x + 0.2 for x in xs], [p["host_ms"] for p in points], 0.4, label="host (overlapped when async)")
    axis.set_xticks(list(xs), labels, rotation=90, fontsize=6)
    axis.set(title="per-step time: device (sync window) split into attention and GEMM/other; host",
             ylabel="ms per step")
    axis.legend(fontsize=7)
    return figure


def write_report(result: dict, directory: str | Path, stem: str = "e2e", plots: bool = True) -> dict[str, Path]:
    """Write <stem>.json, <stem>.md and (with `plots`) <stem>_<plot>.png under `directory`; returns the paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    targets = check_targets(result)
    plots = plot_all(result, directory, stem) if plots else []
    payload = {**result, "targets": targets, "speedups": speedups(result),
               "integrated_speedups": integrated_speedups(result), "plots": [p.name for p in plots]}
    paths = {"json": directory / f"{stem}.json", "markdown": directory / f"{stem}.md"}
    paths["json"].write_text(json.dumps(payload, indent=1, allow_nan=True) + "\n")
    paths["markdown"].write_text(markdown(result, targets))
    paths.update({name: path for name, path in zip(PLOTS, plots)})
    return paths
