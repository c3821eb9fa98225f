"""The README's and docs' Python examples run as written; their measured numbers come from committed results."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
DOCS = sorted((README.parent / "docs").glob("*.md"))


def _python_blocks(page: Path) -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    return [b for b in blocks if not b.startswith("# needs the Hub")]  # exercised by tests/test_hub.py


@pytest.mark.parametrize("page", [README, *[d for d in DOCS if _python_blocks(d)]], ids=lambda p: p.name)
def test_python_blocks_run(page, tmp_path, monkeypatch):
    """Each page's blocks run in order in one namespace, as a reader would paste them."""
    blocks = _python_blocks(page)
    assert blocks
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block.replace("/tmp/merged-sine", str(tmp_path / "merged-sine")), str(page), "exec"), namespace)
    if page == README:
        assert len(blocks) >= 2 and namespace["student"] is not None


def test_readme_demo_numbers_are_the_committed_demo_results():
    text = README.read_text()
    demo = json.loads((README.parent / "benchmarks" / "results" / "demo.json").read_text())
    summary = demo["summary"]
    for label, key in (("student", "student"), ("bo3", "bo3"), ("one model", "one_model")):
        row = re.search(rf"^\| {label} \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \|$", text, flags=re.M)
        assert row, label
        expected = [f"{summary[key][stat]:.4f}" for stat in ("min", "median", "mean", "max")]
        assert list(row.groups()) == expected, label
    wins = summary["student_wins"]
    assert (f"The student beat bo3 in {wins['bo3']['wins']}/{wins['bo3']['seeds']} seeds and one model in "
            f"{wins['one_model']['wins']}/{wins['one_model']['seeds']} seeds") in text
    assert demo["stacked"] and f"{demo['seconds']:.0f} s wall, {demo['cpu_seconds']:.0f} CPU s" in text


CITED = {"0.078": "the paper's Table 1 student median, quoted beside the sine benchmark"}


def _floats(value) -> list[float]:
    if isinstance(value, float):
        return [value]
    if isinstance(value, dict):
        return [f for v in value.values() for f in _floats(v)]
    if isinstance(value, list):
        return [f for v in value for f in _floats(v)]
    return []


def test_every_measured_number_in_the_readme_and_the_benchmarks_page_comes_from_committed_results():
    text = README.read_text()
    measured = text[text.index("### Measured"):text.index("## Python API")] + text[text.index("## Results"):text.index("## More")]
    measured += (README.parent / "docs" / "benchmarks.md").read_text()
    results = README.parent / "benchmarks" / "results"
    corpus = "".join(p.read_text() for p in sorted(results.glob("*.md")) + sorted(results.glob("*.json")))
    corpus += " ".join(f"{f:.4f}" for f in _floats(json.loads((results / "demo.json").read_text())))
    numbers = set(re.findall(r"(?<![\w.])(\d+\.\d{2,})(?![\w.])", measured))
    assert len(numbers) > 50
    assert sorted(n for n in numbers if n not in corpus and n not in CITED) == []
