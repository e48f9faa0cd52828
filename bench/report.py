"""latest.json (everything) and latest.md (the readable summary), written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:  # nan
            return "nan"
        magnitude = abs(value)
        if magnitude == 0:
            return "0"
        if magnitude >= 1000:
            return f"{value:,.0f}"
        if magnitude >= 100:
            return f"{value:.1f}"
        if magnitude >= 1:
            return f"{value:.3g}" if magnitude < 10 else f"{value:.2f}"
        if magnitude >= 1e-3:
            return f"{value:.3g}"
        return f"{value:.2e}"
    return str(value)


def _cell(metric: dict[str, Any]) -> tuple[str, str, str]:
    if "median" not in metric:
        return _fmt(metric.get("value")), "", str(metric.get("n", 1))
    if metric["n"] <= 1:
        return _fmt(metric["median"]), "", str(metric["n"])
    return _fmt(metric["median"]), f"{_fmt(metric['min'])} – {_fmt(metric['max'])}", str(metric["n"])


def markdown(results: dict[str, Any]) -> str:
    m, v = results["machine"], results["versions"]
    lines = [
        "# masksweep benchmark results",
        "",
        f"`{results['command']}` ({results['preset']} preset, device `{results['device']}`), "
        f"{results['created']}, {results['duration_s'] / 60:.1f} min.",
        "",
        "Each figure: median, [min – max] over n repeats. Variants were measured side by side with "
        "interleaved repeats on a shared machine; ratios are taken within a repeat.",
        "",
    ]
    if results.get("kept_from_earlier_runs"):
        lines += [
            f"Figures {', '.join(results['kept_from_earlier_runs'])} are kept from an earlier run (each says "
            "which, under `measured_by` in latest.json); this run measured the others.",
            "",
        ]
    lines += [
        "## Machine and versions",
        "",
        f"- CPU: {m.get('cpu')}, {m.get('cores')} cores, {m.get('memory_gib')} GiB memory, "
        f"torch threads {m.get('torch_threads')}; GPU: {m.get('gpu') or 'none'}",
        f"- load average at start {m.get('load_average_start')}, at end {results.get('load_average_end')} "
        "(a busy machine slows everything; ratios are less affected than absolute times)",
        f"- {m.get('platform')}",
        "- "
        + ", ".join(f"{k} {val}" for k, val in v.items() if k not in ("masksweep_commit", "masksweep_dirty"))
        + f"; masksweep {v.get('masksweep_commit')}"
        + (" (uncommitted changes)" if v.get("masksweep_dirty") else ""),
        "",
        "## Targets",
        "",
        "| figure | target | required | measured | status |",
        "|---|---|---|---|---|",
    ]
    for fig in results["figures"]:
        if fig["error"]:
            lines.append(f"| {fig['id']}. {fig['title']} | (figure failed) | | {fig['error'][:80]} | error |")
        for t in fig["targets"]:
            lines.append(
                f"| {fig['id']}. {fig['title']} | {t['name']} | {t['target']} | {_fmt(t['value'])} | "
                f"**{t['status']}** |"
            )
    for fig in results["figures"]:
        lines += ["", f"## {fig['id']}. {fig['title']} ({fig['status']}, {fig['seconds']:.0f} s)", ""]
        lines += [f"Setup: {fig['setup']}", ""]
        if fig["error"]:
            lines += [f"**Error:** `{fig['error']}`", ""]
        if fig["metrics"]:
            lines += ["| metric | median | min – max | n | unit |", "|---|---|---|---|---|"]
            for name, metric in fig["metrics"].items():
                median, spread, n = _cell(metric)
                lines.append(f"| {name} | {median} | {spread} | {n} | {metric.get('unit', '')} |")
            lines.append("")
        for t in fig["targets"]:
            lines.append(f"- Target: {t['name']} {t['target']} → {_fmt(t['value'])}: **{t['status']}**")
        for note in fig["notes"]:
            lines.append(f"- {note}")
        if fig["id"] == "3b" and "pruner_replay" in fig["details"]:
            lines += _search_replay(fig["details"])
        if fig["id"] == "3a" and "pruner_replay_over_all_orders" in fig["details"]:
            r = fig["details"]["pruner_replay_over_all_orders"]
            lines += [
                "",
                f"Pruner replay (Optuna's own pruners on an in-memory study) over {r['orders']} of the "
                f"{r['of_orders']} trial orders, from the 'without' sweep's full curves (check: the replay "
                f"gives {r['replayed_steps_for_the_real_order']} steps for the real order, the real 'with' "
                f"sweep ran {r['real_steps']}):",
                "",
                "| pruner | steps with/without: median [min – max] | orders <= 0.5 "
                "| orders with the same best trial |",
                "|---|---|---|---|",
            ]
            for row in r["settings"]:
                lines.append(
                    f"| {pruner_label(row['pruner'])} | {row['steps_fraction_median']} "
                    f"[{row['steps_fraction_min']} – {row['steps_fraction_max']}] | "
                    f"{row['share_of_orders_at_most_half']:.0%} | {row['share_of_orders_same_best']:.0%} |"
                )
        if fig["id"] == "8" and "sides" in fig["details"]:
            lines += _slots_table(fig["details"])
        if fig["id"] == "9" and "hits" in fig["details"]:
            lines += _chaos_hits(fig["details"])
        if fig.get("analysis"):
            lines += ["", "Analysis: " + fig["analysis"]]
    lines.append("")
    return "\n".join(lines)


def _search_replay(details: dict[str, Any]) -> list[str]:
    """Figure 3b's tables: each seed's real sweeps, and every pruner setting replayed on the curves."""
    lines = [
        "",
        "| seed | steps with / without | best with / without | wall with / without (s) | pruned | diverged |",
        "|---|---|---|---|---|---|",
    ]
    for p in details["per_seed"]:
        lines.append(
            f"| {p['seed']} | {p['steps_with']} / {p['steps_without']} = {_fmt(p['steps_ratio'])} | "
            f"{_fmt(p['best_with'])} / {_fmt(p['best_without'])} = {_fmt(p['best_ratio'])} | "
            f"{_fmt(p['wall_with_s'])} / {_fmt(p['wall_without_s'])} | {p['pruned_with']} | "
            f"{p['diverged_with']} |"
        )
    replayed = details["pruner_replay"]
    lines += [
        "",
        "Optuna's pruners replayed on the 'without' sweeps' curves, in the order TPE ran each seed's trials "
        f"(chosen: {pruner_label(replayed['chosen'])}; the real 'with' sweeps used "
        f"{pruner_label(replayed['used'])}):",
        "",
        "| pruner | steps with/without: median [min – max] | best value with/without: median [min – max] "
        "| both targets |",
        "|---|---|---|---|",
    ]
    for row in replayed["settings"]:
        st, bv = row["steps_ratio"], row["best_ratio"]
        lines.append(
            f"| {pruner_label(row['pruner'])} | {_fmt(st['median'])} [{_fmt(st['min'])} – "
            f"{_fmt(st['max'])}] | {_fmt(bv['median'])} [{_fmt(bv['min'])} – {_fmt(bv['max'])}] | "
            f"{'yes' if row['meets_both'] else 'no'} |"
        )
    return lines


def _slots_table(details: dict[str, Any]) -> list[str]:
    """Figure 8: both schedules side by side on the same trial lengths."""
    lines = [
        "",
        "| schedule | slot utilization | time to n_trials (s) | first start to last result (s) | busy (s) |",
        "|---|---|---|---|---|",
    ]
    for name, side in details["sides"].items():
        lines.append(
            f"| {name} | {_fmt(side['utilization'])} | {_fmt(side['wall_s'])} | {_fmt(side['span_s'])} | "
            f"{_fmt(side['busy_s'])} |"
        )
    return lines


def _chaos_hits(details: dict[str, Any]) -> list[str]:
    """Figure 9: every job the chaos loop hit, what accounting says happened to it and how its trial ended."""
    lines = ["", "| job | trial | action | sacct states | trial state |", "|---|---|---|---|---|"]
    for hit in details["hits"]:
        lines.append(
            f"| {hit['job']} | #{hit['trial']} | {hit['action']} | {' → '.join(hit.get('sacct', []))} | "
            f"{hit.get('trial_state', '?')} |"
        )
    return lines


def pruner_label(pruner: dict[str, Any]) -> str:
    """`median (n_startup_trials=2, n_warmup_steps=1)` from a PrunerConfig mapping."""
    settings = ", ".join(f"{k}={v}" for k, v in pruner.items() if k != "name")
    return f"{pruner['name']} ({settings})" if settings else pruner["name"]


def write(results: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in (
        ("latest.json", json.dumps(results, indent=1, default=str) + "\n"),
        ("latest.md", markdown(results)),
    ):
        path = out_dir / name
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        paths.append(path)
    return paths[0], paths[1]
