"""Summaries of multi-seed results: per-strategy statistics, wins of the student, text and markdown tables."""

from __future__ import annotations

import statistics
from typing import Any


def summarize(
    runs: list[dict[str, Any]], strategies: list[str], higher_is_better: bool, baselines: list[str] | None = None
) -> dict[str, Any]:
    """Min/median/mean/max/std per strategy over seeds, and in how many seeds the student beat each of ``baselines``
    (default: every strategy but the student)."""
    summary: dict[str, Any] = {"seeds": len(runs), "higher_is_better": higher_is_better}
    for name in strategies:
        values = [r[name] for r in runs if name in r]
        if values:
            summary[name] = {
                "min": min(values),
                "median": statistics.median(values),
                "mean": statistics.fmean(values),
                "max": max(values),
                "std": statistics.pstdev(values),
            }
    better = (lambda s, b: s > b) if higher_is_better else (lambda s, b: s < b)
    summary["student_wins"] = {
        name: sum(better(r["student"], r[name]) for r in runs)
        for name in (baselines if baselines is not None else strategies)
        if name != "student" and name in summary and "student" in summary
    }
    return summary


def text_table(summary: dict[str, Any], strategies: list[str], metric: str) -> str:
    """A plain-text table for the terminal."""
    lines = [f"{'strategy':<12} {'min':>8} {'median':>8} {'mean':>8} {'max':>8}   (test {metric}, {summary['seeds']} seeds)"]
    for name in strategies:
        if name in summary:
            s = summary[name]
            lines.append(f"{name:<12} {s['min']:>8.4f} {s['median']:>8.4f} {s['mean']:>8.4f} {s['max']:>8.4f}")
    seeds = summary["seeds"]
    wins = ", ".join(f"than {name.replace('_', ' ')} in {count}/{seeds}" for name, count in summary["student_wins"].items())
    if wins:
        lines.append(f"student better {wins}")
    return "\n".join(lines)


def markdown_table(summary: dict[str, Any], strategies: list[str], metric: str) -> str:
    """The same as a markdown table."""
    lines = ["| strategy | min | median | mean | max | std |", "|---|---|---|---|---|---|"]
    for name in strategies:
        if name in summary:
            s = summary[name]
            lines.append(f"| {name} | {s['min']:.4f} | {s['median']:.4f} | {s['mean']:.4f} | {s['max']:.4f} | {s['std']:.4f} |")
    seeds = summary["seeds"]
    lines.append("")
    lines.append(f"Test {metric} over {seeds} seeds. " + "; ".join(
        f"student better than {name.replace('_', ' ')} in {count}/{seeds} seeds" for name, count in summary["student_wins"].items()
    ))
    return "\n".join(lines) + "\n"
