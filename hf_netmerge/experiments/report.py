"""Summaries of multi-seed results: statistics per strategy, the student's wins, budgets, and text and markdown tables."""

from __future__ import annotations

import statistics
from typing import Any


def stats(values: list[float]) -> dict[str, float]:
    """Min, median, mean, max, population std and count."""
    return {"min": min(values), "median": statistics.median(values), "mean": statistics.fmean(values), "max": max(values),
            "std": statistics.pstdev(values), "n": len(values)}


def summarize(runs: list[dict[str, Any]], strategies: list[str], higher_is_better: bool, baselines: list[str] | None = None) -> dict[str, Any]:
    """Statistics per strategy over the seeds that ran it; in how many of the seeds both ran the student beat each of
    ``baselines`` (default: every strategy but the student); CPU seconds and training multiply-adds where rows have them."""
    summary: dict[str, Any] = {"seeds": len(runs), "higher_is_better": higher_is_better}
    for name in strategies:
        values = [r[name] for r in runs if name in r]
        if values:
            summary[name] = stats(values)
    better = (lambda s, b: s > b) if higher_is_better else (lambda s, b: s < b)
    both = {name: [r for r in runs if name in r and "student" in r] for name in (baselines if baselines is not None else strategies)}
    summary["student_wins"] = {
        name: {"wins": sum(better(r["student"], r[name]) for r in rows), "seeds": len(rows)}
        for name, rows in both.items()
        if name != "student" and rows
    }
    seconds = {name: [r["cpu_seconds"][name] for r in runs if name in r.get("cpu_seconds", {})] for name in strategies}
    summary["cpu_seconds"] = {name: stats(v) for name, v in seconds.items() if v}
    ratios = {name: [r["macs"][name] / r["macs"]["student"] for r in runs if name in r.get("macs", {}) and "student" in r["macs"]]
              for name in strategies}
    summary["macs_over_student"] = {name: statistics.fmean(v) for name, v in ratios.items() if v}
    return summary


def wins_line(summary: dict[str, Any]) -> str:
    """``student better than bo3 in 3/3 seeds; ...``."""
    return "; ".join(f"student better than {name.replace('_', ' ')} in {w['wins']}/{w['seeds']} seeds"
                     for name, w in summary["student_wins"].items())


def text_table(summary: dict[str, Any], strategies: list[str], metric: str) -> str:
    """A plain-text table for the terminal."""
    lines = [f"{'strategy':<12} {'min':>8} {'median':>8} {'mean':>8} {'max':>8}   (test {metric}, {summary['seeds']} seeds)"]
    for name in strategies:
        if name in summary:
            s = summary[name]
            lines.append(f"{name:<12} {s['min']:>8.4f} {s['median']:>8.4f} {s['mean']:>8.4f} {s['max']:>8.4f}")
    if summary["student_wins"]:
        lines.append(wins_line(summary))
    return "\n".join(lines)


def markdown_table(summary: dict[str, Any], strategies: list[str], metric: str) -> str:
    """A markdown table of every strategy's statistics, its training multiply-adds over the student's and CPU seconds
    per seed (where measured), then the student's wins."""
    lines = ["| strategy | min | median | mean | max | std | seeds | training MACs / student's | CPU s per seed |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in (n for n in strategies if n in summary):
        t = summary[name]
        macs = f"{summary['macs_over_student'][name]:.2f}" if name in summary["macs_over_student"] else ""
        secs = f"{summary['cpu_seconds'][name]['mean']:.1f}" if name in summary["cpu_seconds"] else ""
        lines.append(f"| {name} | {t['min']:.4f} | {t['median']:.4f} | {t['mean']:.4f} | {t['max']:.4f} | {t['std']:.4f} "
                     f"| {t['n']} | {macs} | {secs} |")
    lines += ["", f"Test {metric} over {summary['seeds']} seeds. {wins_line(summary)}."]
    return "\n".join(lines) + "\n"
