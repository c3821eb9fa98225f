"""What the benchmarks share beyond the experiment API: a process pool with a per-seed cache, the machine
description and command written next to every result, and a bar chart."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import accelerate
import timm
import torch

import hf_netmerge as hm

RESULTS = Path(__file__).parent / "results"


def machine() -> dict[str, Any]:
    """The machine and library versions a result was measured with."""
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "accelerate": accelerate.__version__,
        "hf_netmerge": hm.__version__,
    }


def command() -> str:
    return " ".join([".venv/bin/python", *sys.argv])


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def cache_dir(work_dir: Path, settings: dict[str, Any]) -> Path:
    """``work_dir/<digest of settings>``: where a benchmark keeps what it may reuse on a rerun with the same settings."""
    return work_dir / hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def pool_seeds(job: Callable[[int], dict[str, Any]], seeds: list[int], work_dir: Path, workers: int,
              settings: dict[str, Any]) -> list[dict[str, Any]]:
    """``job(seed)`` for every seed not yet cached, in ``workers`` processes of one thread.

    Results are cached one JSON per seed in :func:`cache_dir`, so a rerun with the same settings
    resumes and one with other settings starts afresh.
    """
    cache = cache_dir(work_dir, settings)
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "settings.json").write_text(json.dumps(settings, sort_keys=True))
    todo = [s for s in seeds if not (cache / f"seed{s}.json").is_file()]
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_worker_init, initargs=(1,)) as pool:
        for row in pool.imap_unordered(job, todo):
            tmp = cache / f"seed{row['seed']}.json.tmp"
            tmp.write_text(json.dumps(row))
            os.replace(tmp, cache / f"seed{row['seed']}.json")
            print(f"seed {row['seed']}: " + ", ".join(f"{k} {row[k]:.4f}" for k in row if isinstance(row[k], float)), flush=True)
    return [json.loads((cache / f"seed{s}.json").read_text()) for s in seeds]


def target_table(rows: list[tuple[str, str, bool]]) -> list[str]:
    """Markdown rows of ``(target, measured, met)``: a missed target says so in bold."""
    return ["| target | measured | |", "|---|---|---|",
            *(f"| {target} | {measured} | {'met' if met else '**missed**'} |" for target, measured, met in rows), ""]


def bar_chart(path: Path, panels: list[tuple[str, dict[str, float], float | None]]) -> None:
    """One horizontal bar panel per ``(title, {label: value}, target line or None)``, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 0.5 + 0.45 * max(len(v) for _, v, _ in panels)), squeeze=False)
    for ax, (title, values, target) in zip(axes[0], panels):
        ax.barh(list(values), list(values.values()), color="tab:blue")
        if target is not None:
            ax.axvline(target, color="tab:red", linestyle=":", label=f"target {target:g}")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
