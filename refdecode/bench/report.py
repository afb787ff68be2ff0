"""Benchmark report: summaries, the markdown table, JSON and plots, from the raw results of `runner.run_benchmark`.

Knows: how per-prompt records aggregate (totals and medians), which ratios are reported, the Spec-Bench
leaderboard's layout and its published figures, and the files written to the output folder. Does not run models.

Ratios of speed are ratios of decoding throughput: "total" divides total decode tokens by total decode seconds per
method, "median" is the median over prompts of the per-prompt ratio. A speed-up above 1 means faster.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

__all__ = ["SPEC_BENCH_CATEGORIES", "PUBLISHED_SPEC_BENCH", "summarize", "format_report", "write_report"]

SPEC_BENCH_CATEGORIES = ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag")
# Speed-ups over greedy published on the Spec-Bench leaderboard (Vicuna-7B, one A100, greedy);
# see /work/shared/data/spec_bench/README.md. Only overall figures exist for the other methods.
PUBLISHED_SPEC_BENCH = {
    "pld": {"overall": 1.66, "summarization": 2.66, "rag": 1.86, "translation": 1.06},
    "others_overall": {"REST": 1.48, "Lookahead": 1.34, "SAM-Decoding": 1.84, "Token Recycling": 2.22},
}
RATIOS = (
    ("pld", "greedy"),
    ("refdecode", "greedy"),
    ("refdecode", "pld"),
    ("oracle", "greedy"),
    ("refdecode-sample", "hf-sample"),
    ("refdecode-chain", "greedy"),
    ("suffix", "greedy"),
    ("suffix-tree", "greedy"),
    ("refdecode-chain-sample", "hf-sample"),
)
# head to head, in one run: refdecode's tree vs its chain, and vs SuffixDecoding's drafter in the same loop
COMPARISONS = (
    ("refdecode", "refdecode-hf-kernels"),
    ("refdecode", "refdecode-no-guard"),
    ("refdecode", "refdecode-chain"),
    ("refdecode", "suffix-tree"),
    ("refdecode", "suffix"),
    ("refdecode-chain", "suffix"),
    ("refdecode-sample", "refdecode-chain-sample"),
)
LABELS = {
    "greedy": "greedy",
    "pld": "prompt lookup",
    "refdecode": "refdecode",
    "refdecode-chain": "refdecode chain",
    "refdecode-hf-kernels": "refdecode, transformers kernels",
    "refdecode-no-guard": "refdecode without the tie guard",
    "suffix": "SuffixDecoding",
    "suffix-tree": "SuffixDecoding tree",
    "oracle": "oracle",
    "hf-sample": "HF sampling",
    "refdecode-sample": "refdecode sampling",
    "refdecode-chain-sample": "refdecode chain sampling",
}
# greedy methods whose tokens per step are set against the oracle's (same loop, same policy)
STEP_FRACTION_METHODS = tuple(m for m in LABELS if m.startswith(("refdecode", "suffix")) and not m.endswith("-sample"))


# ---------------------------------------------------------------------------------------------------------------
# summaries


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize_method(records: list[dict]) -> dict:
    """Totals and medians of one method's records over a group of prompts."""
    tokens = sum(r["decode_tokens"] for r in records)
    seconds = sum(r["decode_seconds"] for r in records)
    new = sum(r["new_tokens"] for r in records)
    e2e = sum(r["e2e_seconds"] for r in records)
    steps = sum(r["steps"] for r in records)
    lengths = [n for r in records for n in r["accept_lengths"]]
    out = {
        "n": len(records),
        "new_tokens": new,
        "decode_tokens": tokens,
        "decode_seconds": seconds,
        "prefill_seconds": sum(r["prefill_seconds"] for r in records),
        "e2e_seconds": e2e,
        "tokens_per_second": tokens / seconds if seconds > 0 and tokens else None,
        "median_tokens_per_second": _median(r["tokens_per_second"] for r in records),
        "e2e_tokens_per_second": new / e2e if e2e > 0 else None,
        "steps": steps,
        "mean_accepted": tokens / steps if steps else None,
        "accept_length_counts": {str(k): lengths.count(k) for k in sorted(set(lengths))},
        "mean_tree_size": _mean_tree_size(records),
        "accepted_sources": _accepted_sources(records),
        "acceptance_rate": _acceptance_rate(records),
        "draft_ms_per_step": 1000 * sum(r.get("draft_seconds", 0.0) for r in records) / steps if steps else None,
    }
    timed = [r for r in records if "forward_seconds" in r]  # refdecode's loop times the target's forwards
    timed_steps = sum(r["steps"] for r in timed)
    if timed and timed_steps:
        forward = sum(r["forward_seconds"] for r in timed)
        decode = sum(r["decode_seconds"] for r in timed)
        out.update(
            forward_ms_per_step=1000 * forward / timed_steps,
            overhead_ms_per_step=1000 * max(0.0, decode - forward) / timed_steps,
            policy_ms_per_step=1000 * sum(r.get("policy_seconds", 0.0) for r in timed) / timed_steps,
            overhead_share=max(0.0, decode - forward) / decode if decode > 0 else None,
        )
    if any("matches_greedy" in r for r in records):
        bad = [r for r in records if not r.get("matches_greedy", True)]
        out["mismatches"] = len(bad)
        out["mismatched"] = [{"request_id": r["request_id"], "first_mismatch": r["first_mismatch"]} for r in bad]
    return out


def _mean_tree_size(records: list[dict]) -> float | None:
    """Draft nodes verified per step: the records' tree_sizes, else drafted tokens / steps (a chain of k is a tree of
    k nodes); None for methods that do not say (transformers)."""
    sizes = [n for r in records for n in r.get("tree_sizes", ())]
    if sizes:
        return sum(sizes) / len(sizes)
    steps = sum(r["steps"] for r in records if "drafted_tokens" in r)
    return sum(r["drafted_tokens"] for r in records if "drafted_tokens" in r) / steps if steps else None


def _acceptance_rate(records: list[dict]) -> float | None:
    """Accepted over verified draft tokens (tree nodes count as drafted); None for methods that do not say."""
    drafted = sum(r.get("drafted_tokens", 0) for r in records)
    return sum(r.get("accepted_tokens", 0) for r in records) / drafted if drafted else None


def _accepted_sources(records: list[dict]) -> dict[str, int]:
    """Accepted draft tokens per source, summed over the records that say."""
    total: dict[str, int] = {}
    for r in records:
        for source, n in r.get("accepted_sources", {}).items():
            total[source] = total.get(source, 0) + n
    return dict(sorted(total.items(), key=lambda kv: -kv[1]))


def _step_fraction(per_step: float | None, oracle_per_step: float | None) -> float | None:
    """(tokens per step - 1) / (the oracle's tokens per step - 1): how much of a perfect drafter's gain per forward
    a method gets under the same policy."""
    if per_step is None or oracle_per_step is None or oracle_per_step <= 1:
        return None
    return (per_step - 1) / (oracle_per_step - 1)


DRAFTER_ROWS = ("drafter:", "prophet:", "refdecode+", "assisted")  # prophet: is the name in results before 2026-12
DRAFTER_BASES = ("greedy", "pld", "refdecode")  # what each model-drafter row is set against


def summarize_group(records: list[dict], methods: list[str]) -> dict:
    """Per-method summaries of one group of prompts, the reported ratios, and the fraction of the oracle's gain."""
    by_method = {m: [r for r in records if r["method"] == m] for m in methods}
    summaries = {m: summarize_method(rs) for m, rs in by_method.items() if rs}
    block: dict = {"n": len({r["request_id"] for r in records}), "methods": summaries}
    ratios = {}
    drafters = [(m, base) for m in summaries if m.startswith(DRAFTER_ROWS) for base in DRAFTER_BASES]
    assisted = [(m, "assisted") for m in summaries if m.startswith("refdecode+") and "assisted" in summaries]
    for a, b in [*RATIOS, *COMPARISONS, *drafters, *assisted]:
        if a not in summaries or b not in summaries:
            continue
        sa, sb = summaries[a], summaries[b]
        per_prompt = {r["request_id"]: r["tokens_per_second"] for r in by_method[b]}
        ratios[f"{a}/{b}"] = {
            "total": _ratio(sa["tokens_per_second"], sb["tokens_per_second"]),
            "median": _median(_ratio(r["tokens_per_second"], per_prompt.get(r["request_id"])) for r in by_method[a]),
            "e2e": _ratio(sa["e2e_tokens_per_second"], sb["e2e_tokens_per_second"]),
            "per_step": _ratio(sa["mean_accepted"], sb["mean_accepted"]),
        }
    block["ratios"] = ratios
    ref, orc = ratios.get("refdecode/greedy", {}).get("total"), ratios.get("oracle/greedy", {}).get("total")
    block["oracle_fraction"] = (ref - 1) / (orc - 1) if ref and orc and orc > 1 else None
    oracle_per_step = summaries["oracle"]["mean_accepted"] if "oracle" in summaries else None
    for m in STEP_FRACTION_METHODS:
        if m in summaries:
            summaries[m]["oracle_step_fraction"] = _step_fraction(summaries[m]["mean_accepted"], oracle_per_step)
    return block


def summarize(results: dict) -> dict:
    """Per workload, per Spec-Bench category (+ overall) when spec-bench ran, and over all prompts."""
    records, methods = results["records"], results["meta"]["methods"]
    workloads = list(dict.fromkeys(r["workload"] for r in records))
    summary = {
        "workloads": {w: summarize_group([r for r in records if r["workload"] == w], methods) for w in workloads}
    }
    spec = [r for r in records if r["workload"] == "spec-bench"]
    if spec:
        cats = {
            c: summarize_group([r for r in spec if r["category"] == c], methods)
            for c in SPEC_BENCH_CATEGORIES
            if any(r["category"] == c for r in spec)
        }
        cats["overall"] = summarize_group(spec, methods)
        summary["spec_bench"] = cats
    summary["all"] = summarize_group(records, methods)
    return summary


# ---------------------------------------------------------------------------------------------------------------
# markdown


def _x(v: float | None) -> str:
    return f"{v:.2f}x" if v is not None else "-"


def _f(v: float | None, digits: int = 1) -> str:
    return f"{v:.{digits}f}" if v is not None else "-"


def _pair(block: dict, key: str) -> str:
    r = block["ratios"].get(key)
    return f"{_x(r['total'])} (med {_x(r['median'])})" if r else "-"


def _identical(block: dict) -> str:
    parts = []
    for m in block["methods"]:
        s = block["methods"].get(m)
        if s is None or "mismatches" not in s:
            continue
        if s["mismatches"]:
            first = ", ".join(f"@{x['first_mismatch']}" for x in s["mismatched"][:3])
            parts.append(f"{LABELS.get(m, m)}: {s['mismatches']}/{s['n']} differ ({first})")
        else:
            parts.append(f"{LABELS.get(m, m)} {s['n']}/{s['n']}")
    return "; ".join(parts) or "-"


def _tps(block: dict, m: str) -> str:
    s = block["methods"].get(m)
    return _f(s["tokens_per_second"]) if s else "-"


def main_table(groups: dict[str, dict]) -> list[str]:
    lines = [
        "| workload | n | greedy tok/s | PLD tok/s | refdecode tok/s | oracle tok/s | refdecode / greedy "
        "| refdecode / PLD | PLD / greedy | e2e s greedy / PLD / refdecode | e2e refdecode / greedy "
        "| accepted per step refdecode / PLD / oracle | of oracle gain | identical to greedy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, b in groups.items():
        m = b["methods"]
        e2e = " / ".join(_f(m[k]["e2e_seconds"], 2) if k in m else "-" for k in ("greedy", "pld", "refdecode"))
        acc = " / ".join(_f(m[k]["mean_accepted"], 2) if k in m else "-" for k in ("refdecode", "pld", "oracle"))
        frac = f"{b['oracle_fraction'] * 100:.0f}%" if b["oracle_fraction"] is not None else "-"
        e2e_ratio = _x(b["ratios"].get("refdecode/greedy", {}).get("e2e"))
        lines.append(
            f"| {name} | {b['n']} | {_tps(b, 'greedy')} | {_tps(b, 'pld')} | {_tps(b, 'refdecode')} | "
            f"{_tps(b, 'oracle')} | {_pair(b, 'refdecode/greedy')} | {_pair(b, 'refdecode/pld')} | "
            f"{_pair(b, 'pld/greedy')} | {e2e} | {e2e_ratio} | {acc} | {frac} | {_identical(b)} |"
        )
    return lines


def _sources(summary: dict) -> str:
    counts = summary.get("accepted_sources") or {}
    total = sum(counts.values())
    return ", ".join(f"{s} {n / total:.0%}" for s, n in list(counts.items())[:4]) if total else "-"


def methods_table(groups: dict[str, dict]) -> list[str]:
    """One row per workload and method (the baseline aside): speed, tokens per step, tree size, oracle fraction."""
    lines = [
        "| workload | method | tok/s | / baseline (total, median) | tokens per step | mean tree size "
        "| of oracle gain per step | accepted draft tokens from |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, b in groups.items():
        for m, s in b["methods"].items():
            if m in ("greedy", "hf-sample"):
                continue
            base = "hf-sample" if m.endswith("-sample") else "greedy"
            frac = s.get("oracle_step_fraction")
            lines.append(
                f"| {name} | {LABELS.get(m, m)} | {_f(s['tokens_per_second'])} | {_pair(b, f'{m}/{base}')} | "
                f"{_f(s['mean_accepted'], 2)} | {_f(s.get('mean_tree_size'), 1)} | "
                f"{f'{frac * 100:.0f}%' if frac is not None else '-'} | {_sources(s)} |"
            )
    return lines


def comparisons_table(groups: dict[str, dict]) -> list[str]:
    """Head to head ratios measured in one run (COMPARISONS present): decoding speed and tokens per step."""
    keys = [f"{a}/{b}" for a, b in COMPARISONS if any(f"{a}/{b}" in g["ratios"] for g in groups.values())]
    if not keys:
        return []
    heads = [" / ".join(LABELS.get(m, m) for m in k.split("/")) for k in keys]
    lines = [
        "| workload | " + " | ".join(f"{h}: tok/s, per step" for h in heads) + " |",
        "|---|" + "---:|" * len(keys),
    ]
    for name, b in groups.items():
        cells = []
        for k in keys:
            r = b["ratios"].get(k)
            cells.append(f"{_x(r['total'])}, {_x(r['per_step'])}" if r else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def spec_bench_table(cats: dict[str, dict]) -> list[str]:
    published = PUBLISHED_SPEC_BENCH["pld"]
    lines = [
        "| category | n | PLD / greedy | refdecode / greedy | oracle / greedy | accepted per step "
        "| published PLD / greedy (Vicuna-7B, A100) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in SPEC_BENCH_CATEGORIES + ("overall",):
        if c not in cats:
            continue
        b = cats[c]
        acc = _f(b["methods"]["refdecode"]["mean_accepted"], 2) if "refdecode" in b["methods"] else "-"
        lines.append(
            f"| {c} | {b['n']} | {_x(b['ratios'].get('pld/greedy', {}).get('total'))} | "
            f"{_x(b['ratios'].get('refdecode/greedy', {}).get('total'))} | "
            f"{_x(b['ratios'].get('oracle/greedy', {}).get('total'))} | {acc} | "
            f"{_x(published.get(c))} |"
        )
    others = ", ".join(f"{k} {v:.2f}x" for k, v in PUBLISHED_SPEC_BENCH["others_overall"].items())
    lines += [
        "",
        f"Published overall speed-ups of other methods on the leaderboard: {others}. Those are 7B "
        "models on an A100; the ratio depends on the model and the device's forward-cost curve.",
    ]
    return lines


def sampling_table(groups: dict[str, dict]) -> list[str]:
    lines = [
        "| workload | HF sampling tok/s | refdecode sampling tok/s | refdecode / HF (total, median) "
        "| accepted per step |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, b in groups.items():
        if "refdecode-sample" not in b["methods"]:
            continue
        lines.append(
            f"| {name} | {_tps(b, 'hf-sample')} | {_tps(b, 'refdecode-sample')} | "
            f"{_pair(b, 'refdecode-sample/hf-sample')} | "
            f"{_f(b['methods']['refdecode-sample']['mean_accepted'], 2)} |"
        )
    return lines


def model_drafters_table(groups: dict[str, dict]) -> list[str]:
    """One row per workload and model-drafter method (alone, or with the references): speed against greedy,
    prompt lookup and the references alone, tokens per step, acceptance and what drafting cost."""
    lines = [
        "| workload | method | tok/s | / greedy | / prompt lookup | / references alone | / assisted | tokens per step "
        "| draft acceptance | draft ms per step | accepted draft tokens from |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    rows = 0
    for name, b in groups.items():
        for m, s in b["methods"].items():
            if m not in ("refdecode",) and not m.startswith(DRAFTER_ROWS):
                continue
            rate = s.get("acceptance_rate")
            lines.append(
                f"| {name} | {m} | {_f(s['tokens_per_second'])} | {_pair(b, f'{m}/greedy')} | {_pair(b, f'{m}/pld')} "
                f"| {_pair(b, f'{m}/refdecode') if m != 'refdecode' else '1.00x'} | {_pair(b, f'{m}/assisted')} "
                f"| {_f(s['mean_accepted'], 2)} | "
                f"{f'{rate * 100:.0f}%' if rate is not None else '-'} | {_f(s.get('draft_ms_per_step'), 1)} | "
                f"{_sources(s)} |"
            )
            rows += m != "refdecode"
    return lines if rows else []


def overhead_table(groups: dict[str, dict]) -> list[str]:
    """One row per workload and refdecode-loop method: a step's time in the target's forward against the loop's own
    work (drafting, the policy, the rest: tree masks, acceptance checks, cache bookkeeping)."""
    lines = [
        "| workload | method | forward ms per step | besides the forward, ms per step | of it drafting | of it policy "
        "| share of decoding |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, b in groups.items():
        for m, s in b["methods"].items():
            if s.get("forward_ms_per_step") is None:
                continue
            share = s.get("overhead_share")
            lines.append(
                f"| {name} | {m} | {_f(s['forward_ms_per_step'])} | {_f(s['overhead_ms_per_step'], 2)} | "
                f"{_f(s.get('draft_ms_per_step'), 2)} | {_f(s.get('policy_ms_per_step'), 2)} | "
                f"{f'{share * 100:.1f}%' if share is not None else '-'} |"
            )
    return lines if len(lines) > 2 else []


def format_report(results: dict, summary: dict) -> str:
    """The markdown report: settings, the main table, Spec-Bench and sampling tables, the forward-cost curve."""
    meta, info, cfg = results["meta"], results["meta"]["machine"], results["meta"]["config"]
    hw = info["gpu"] or info["cpu"]
    out = [
        f"Model `{cfg['model']}` ({info['dtype']}) on {hw} ({info['device']}, {info['torch_threads']} threads); "
        f"torch {info['torch']}, transformers {info['transformers']}, refdecode {info['refdecode']}; "
        f"max_new_tokens {cfg['max_new_tokens']}, seed {cfg['seed']}, greedy.",
        "",
        "Speed is decoding throughput (new tokens after the first / time after the first token); ratios are "
        "total tokens over total decode time, with the median of per-prompt ratios in brackets. "
        '"of oracle gain" = (refdecode/greedy - 1) / (oracle/greedy - 1), the oracle drafting the true greedy '
        "continuation under the same draft policy.",
        "",
    ]
    groups = dict(summary["workloads"])
    if len(groups) > 1:
        groups["all"] = summary["all"]
    out += main_table(groups)
    out += [
        "",
        "Per method: tokens per step = new tokens after the first / verification steps; mean tree size = draft "
        "tokens verified per step (a chain of k counts k); of oracle gain per step = (tokens per step - 1) / "
        "(oracle's - 1). refdecode drafts a token tree per step, refdecode chain one chain (tree=False); "
        "SuffixDecoding is arctic-inference's drafter in refdecode's loop and policy.",
        "",
    ]
    out += methods_table(groups)
    comparisons = comparisons_table(groups)
    if comparisons:
        out += ["", "Head to head, in one run (ratios of decoding throughput and of tokens per step):", ""]
        out += comparisons
    drafters = model_drafters_table(groups)
    if drafters:
        out += [
            "",
            "Model drafters (refdecode.drafters): drafter:X drafts with X alone, refdecode+X puts X's drafts in the "
            "references' tree; draft acceptance = accepted / verified draft tokens (tree nodes included); draft ms "
            "per step = time in the drafter (model forwards, matching) per verification step:",
            "",
        ] + drafters
    overhead = overhead_table(groups)
    if overhead:
        out += [
            "",
            "Where a step's time goes in refdecode's loop: the target's forward (timed inside the model's own call) "
            "and everything besides it, of which drafting (the drafter's propose) and the policy (choosing what to "
            "verify, learning from the verdict); the rest is tree masks, acceptance checks and cache bookkeeping:",
            "",
        ] + overhead
    if "spec_bench" in summary:
        out += ["", "Spec-Bench (first turns), leaderboard layout:", ""] + spec_bench_table(summary["spec_bench"])
    if "refdecode-sample" in meta["methods"]:
        out += ["", "Sampling (temperature 0.7, top_p 0.9; outputs differ by design, not checked):", ""]
        out += sampling_table(groups)
    cost = results["forward_cost"]
    picks = [k for k in (2, 4, 8, 16, 32, 64) if k <= len(cost["relative"])]
    out += [
        "",
        f"Forward cost of k tokens / 1 token after {cost['context_tokens']} cached tokens: "
        + ", ".join(f"k={k} {cost['relative'][k - 1]:.2f}" for k in picks)
        + f" (1 token: {cost['seconds'][0] * 1000:.1f} ms).",
    ]
    if cost.get("routed_widths"):  # refdecode's routed CPU kernels (refdecode.kernels), as its calibration may pick
        pairs = zip(cost["routed_widths"], cost["routed_relative"], strict=True)
        out.append(
            "With refdecode's CPU kernels (transposed products, SDPA's grouped-query attention), over the same "
            "1 token: " + ", ".join(f"k={k} {r:.2f}" for k, r in pairs if k in picks) + "."
        )
    for note in meta.get("notes", []):
        out.append(f"\nNote: {note}")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# files


def write_report(results: dict, out_dir: str | Path, *, plots: bool = True) -> dict:
    """Write results.json (meta, forward cost, per-prompt records, summary), table.md and the PNG plots.
    Returns the summary."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(results)
    (out_dir / "results.json").write_text(json.dumps({**results, "summary": summary}, indent=1))
    (out_dir / "table.md").write_text(format_report(results, summary))
    if plots:
        plot_speedups(summary, out_dir / "speedup.png")
        plot_accept_lengths(results, out_dir / "accept_lengths.png")
        plot_forward_cost(results["forward_cost"], out_dir / "forward_cost.png")
    return summary


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_speedups(summary: dict, path: Path) -> None:
    """Bars: decoding speed-up over the baseline per workload (and Spec-Bench category) and method."""
    plt = _pyplot()
    groups = dict(summary["workloads"])
    groups.pop("spec-bench", None)
    for c, b in summary.get("spec_bench", {}).items():
        groups[f"spec-bench\n{c}"] = b
    keys = [
        k
        for k in (
            "pld/greedy",
            "refdecode/greedy",
            "refdecode-chain/greedy",
            "suffix/greedy",
            "suffix-tree/greedy",
            "oracle/greedy",
            "refdecode-sample/hf-sample",
            "refdecode-chain-sample/hf-sample",
        )
        if any(k in b["ratios"] for b in groups.values())
    ]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(groups) + 2), 4))
    width = 0.8 / max(1, len(keys))
    for j, key in enumerate(keys):
        values = [(b["ratios"].get(key) or {}).get("total") or 0.0 for b in groups.values()]
        xs = [i + (j - (len(keys) - 1) / 2) * width for i in range(len(groups))]
        ax.bar(xs, values, width, label=" / ".join(LABELS.get(m, m) for m in key.split("/")))
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(groups)), list(groups), fontsize=8)
    ax.set_ylabel("decoding speed-up (x)")
    ax.set_title("Decoding throughput over the baseline")
    ax.legend(fontsize=8, loc="upper left", ncol=2)
    ax.set_ylim(
        0,
        max(
            [1.0] + [v for b in groups.values() for v in ((b["ratios"].get(k) or {}).get("total") or 0.0 for k in keys)]
        )
        * 1.25,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_accept_lengths(results: dict, path: Path) -> None:
    """Histograms of tokens committed per verification step (stats.accept_lengths), per workload."""
    plt = _pyplot()
    records = results["records"]
    workloads = list(dict.fromkeys(r["workload"] for r in records))
    shown = ("refdecode", "refdecode-chain", "suffix-tree", "suffix", "oracle", "pld", "refdecode-sample")
    methods = [m for m in shown if m in results["meta"]["methods"]]
    cols = min(4, len(workloads))
    rows = -(-len(workloads) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.8 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[len(workloads) :]:
        ax.axis("off")
    for ax, w in zip(flat, workloads, strict=False):
        top = 1
        for m in methods:
            lengths = [n for r in records if r["workload"] == w and r["method"] == m for n in r["accept_lengths"]]
            if lengths:
                top = max(top, max(lengths))
                ax.hist(lengths, bins=range(1, max(lengths) + 2), histtype="step", label=LABELS.get(m, m), density=True)
        ax.set_title(w, fontsize=9)
        ax.set_xlabel("tokens per step")
        ax.set_xlim(1, top + 1)
    for row in axes:
        row[0].set_ylabel("fraction of steps")
    flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_forward_cost(cost: dict, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(cost["widths"], cost["relative"], marker=".", label="transformers' kernels")
    if cost.get("routed_widths"):
        ax.plot(cost["routed_widths"], cost["routed_relative"], marker=".", label="refdecode's CPU kernels")
    ax.plot(cost["widths"], cost["widths"], color="grey", linestyle=":", label="k (no parallelism)")
    ax.set_ylim(0, max(cost["relative"] + cost.get("routed_relative", [])) * 1.2)
    ax.set_xlabel("tokens in one forward (k)")
    ax.set_ylabel("cost(k) / cost(1)")
    ax.set_title(f"Forward cost after {cost['context_tokens']} cached tokens")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
