"""The model card of a merged student, rendered from its saved record (``netmerge_config.json``): teachers, method and
budgets, gate statistics, metrics, config."""

from __future__ import annotations

from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .validation import teacher_key, teacher_label

CITATION = """@article{pasen2024merging,
  title   = {Merging of Neural Networks},
  author  = {Pa{\\v{s}}en, Martin and Bo{\\v{z}}a, Vladim{\\'\\i}r},
  journal = {Neural Processing Letters},
  year    = {2024},
  note    = {CC BY 4.0}
}"""


_PREPROCESSING_FILE = {"timm": "`config.json`'s `pretrained_cfg`", "transformers": "`preprocessor_config.json`"}


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _metrics_table(metrics: dict[str, dict[str, float]]) -> str:
    names = sorted({k for m in metrics.values() for k in m})
    lines = ["| model | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for model, values in metrics.items():
        lines.append(f"| {model} | " + " | ".join(_fmt(values[n]) if n in values else "" for n in names) + " |")
    return "\n".join(lines)


def _gate_table(record: dict[str, Any]) -> str:
    labels = [teacher_label(i).split()[-1] for i in range(len(record["teachers"]))]
    lines = [
        "| group | size | kept | " + " | ".join(f"from {x}" for x in labels)
        + " | mean P[g>0] | undecided | open in eval | weakest kept gate | channels per gate | final λ |",
        "|---|---|---|" + "---|" * len(labels) + "---|---|---|---|---|---|",
    ]
    for s in record["gate_stats"]:
        lines.append(
            f"| {s['group']} | {s['size']} | {s['kept']} | " + " | ".join(map(str, s["kept_per_teacher"]))
            + f" | {s['mean_p_open']:.3f} | {s['undecided_fraction']:.3f} | {s['open_fraction']:.3f} | {s['min_kept_gate']:.3f} "
            f"| {s['unit']} | {_fmt(record['final_lambda'])} |"
        )
    return "\n".join(lines)


def _teacher_line(label: str, info: dict) -> str:
    where = info.get("reference") or "an in-memory module"
    extra = []
    if info.get("revision"):
        extra.append(f"revision `{info['revision']}`")
    if info.get("sha256"):
        extra.append(f"weights sha256 `{info['sha256']}`")
    tail = f" ({', '.join(extra)})" if extra else ""
    return f"- Teacher {label}: `{where}` [{info['source']}]{tail}"


def _schedule(record: dict[str, Any]) -> str:
    """The gate stage's λ and the recovery levers that ran, in words, with the preset's name."""
    cfg = record["merge_config"]
    if cfg["lambda_schedule"] == "per_epoch":
        lam = f"λ from {cfg['lambda_init']} growing by {_fmt(cfg['lambda_growth'])}·√λ per epoch"
    else:
        lam = f"λ moved step by step ({cfg['lambda_schedule']}) from {cfg['lambda_init']} to {cfg['lambda_final']}"
    closing = (f"; the lowest-scored gates were held closed on a cubic schedule from {cfg['closing_start']} of the stage, "
               "all but the kept ones by its end" if cfg.get("gate_closing", "none") == "cubic" else "")
    head = record.get("head_start_teacher")
    if head is not None:
        closing += (f"; the gates of {teacher_label(head)} (lowest loss on up to "
                    f"{cfg['recalibration_samples']} training examples) started {cfg['gate_head_start']} higher in log α")
    gate_kd = (f"; the gate stage also distilled the teachers' ensemble (α {cfg['gate_distill_alpha']}, T {cfg['distill_temperature']})"
               if cfg["gate_distill_alpha"] > 0 else "")
    recal = ("BatchNorm statistics recomputed after compression on up to "
             f"{cfg['recalibration_samples']} training examples" if cfg["recalibrate_norms"] else "no BatchNorm recalibration")
    kd = (f"distilled from the teachers' ensemble (α {cfg['distill_alpha']}, T {cfg['distill_temperature']})"
          if cfg["distill_alpha"] > 0 else "on the labels alone")
    undecided = record.get("undecided_gates", 0.0)
    return (f"Schedule: **{record.get('preset', 'custom')}** preset. Gate stage: weights SGD lr {cfg['lr']} (momentum "
            f"{cfg['momentum']}), gates Adam lr {cfg['gate_lr']}; {lam}, ending at **{_fmt(record['final_lambda'])}**{closing}{gate_kd}; "
            f"{100 * undecided:.1f}% of the gates undecided (P[g>0] in (0.1, 0.9)) at its end. Then {recal}; fine-tuning "
            f"{cfg['finetune_schedule']} schedule, {kd}.")


def _reported(teachers: int) -> list[tuple[str, str]]:
    """(metrics key, label) of the models the card's ``model-index`` reports: every teacher, the ensemble, the student."""
    models = [(teacher_key(i), teacher_label(i)) for i in range(teachers)]
    return [*models, ("ensemble", "ensemble of the teachers"), ("student", "student")]


def eval_results(record: dict[str, Any]) -> list[EvalResult]:
    """``model-index`` entries: the main metric of the teachers, their ensemble and the student."""
    classification = record["merge_config"]["task"] == "classification"
    metric = "accuracy" if classification else "mse"
    dataset = record["datasets"][0] if record["datasets"] else "custom"
    return [
        EvalResult(
            task_type="image-classification" if classification else "tabular-regression",
            dataset_type=dataset,
            dataset_name=dataset,
            metric_type=metric,
            metric_name=f"{metric} ({label})",
            metric_value=record["metrics"][key][metric],
        )
        for key, label in _reported(len(record["teachers"]))
        if metric in record["metrics"].get(key, {})
    ]


def _format(record: dict[str, Any]) -> str:
    """The checkpoint format a record's network is saved in (records before version 9 knew only timm's)."""
    return record.get("format", "timm")


def _transformers_usage(prep: dict[str, Any] | None) -> str:
    """The ``## Usage`` section of a network saved in transformers' format."""
    gray = prep is not None and prep["input_size"][0] == 1
    pipeline_line = ("" if gray else
                     'classifier = pipeline("image-classification", model="<this repo id>")  # applies the image processor\n')
    note = ("\n\ntransformers' `pipeline(\"image-classification\")` converts every image to RGB, so it cannot feed this "
            "1-channel model: give the model 1-channel `pixel_values` made with the image processor from `.convert(\"L\")` "
            "images." if gray else "")
    return f"""## Usage

```python
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

model = AutoModelForImageClassification.from_pretrained("<this repo id>")  # or "<this folder>"
processor = AutoImageProcessor.from_pretrained("<this repo id>")  # the preprocessing it was trained and evaluated with
{pipeline_line}```{note}
"""


def _usage(architecture: str, prep: dict[str, Any] | None, fmt: str = "timm") -> str:
    """The card's ``## Usage`` section: loading with transformers for its format, else with timm (and transformers'
    timm wrapper where it can feed the model)."""
    if fmt == "transformers":
        return _transformers_usage(prep)
    register = (
        "import hf_netmerge  # registers this architecture with timm: needed before loading\n"
        if architecture.startswith("netmerge_")
        else ""
    )
    transform_lines = (
        'config = timm.data.resolve_data_config({}, model=model)  # the preprocessing it was trained and evaluated with\n'
        'transform = timm.data.create_transform(**config)         # eval transform for PIL images'
        + (' (convert them with .convert("L") first)' if prep["input_size"][0] == 1 else "") + "\n"
        if prep is not None else ""
    )
    transformers_section = (
        "transformers' `pipeline(\"image-classification\")` converts every image to RGB, so it cannot feed this "
        "1-channel model: use timm as above (or `AutoModelForImageClassification` with 1-channel `pixel_values` you "
        "make with that transform)." if prep is not None and prep["input_size"][0] == 1 else
        f"""With transformers (its timm wrapper; `pip install transformers`):

```python
from transformers import AutoModelForImageClassification, pipeline
{register}
model = AutoModelForImageClassification.from_pretrained("<this repo id>")
classifier = pipeline("image-classification", model="<this repo id>")
```"""
    )
    return f"""## Usage

With timm:

```python
import timm
{register}
model = timm.create_model("hf-hub:<this repo id>", pretrained=True).eval()  # or "local-dir:<this folder>"
{transform_lines}```

{transformers_section}
"""


def render_card(record: dict[str, Any]) -> str:
    """The README.md text (YAML front matter + body) from a student's record (``MergeResult.record()``, as saved)."""
    hub_ids = [t["reference"] if t["source"] == "hf-hub" else t["hub_origin"] for t in record["teachers"]
               if t["source"] == "hf-hub" or t.get("hub_origin")]
    results = eval_results(record)
    architecture, cfg, metrics = record["architecture"], record["merge_config"], record["metrics"]
    measured = (f"On {record['eval_examples']} evaluation examples.\n\n{_metrics_table(metrics)}" if metrics
                else "No evaluation data was given.")
    library = _format(record)
    data = ModelCardData(
        license=record.get("license"),
        library_name=library,
        tags=["hf_netmerge", "model-merging", library, cfg["task"]],
        base_model=hub_ids or None,
        base_model_relation="merge" if hub_ids else None,
        datasets=record["datasets"] or None,
        model_name=f"{architecture}-netmerge" if results else None,
        eval_results=results or None,
    )
    stages = "\n".join(f"| {r['stage']} | {r['epochs']} | {r['steps']} | {r['seconds']:.1f} |" for r in record["stages"])
    gap = ", ".join(f"{k} {_fmt(v)}" for k, v in record["function_gap"].items()) or "not measured (no eval data)"
    inexact = [s["group"] for s in record["gate_stats"] if not s["exact_compression"]]
    mixed = (f" Groups {', '.join(inexact)} are normalized by a LayerNorm over channels that the student takes from several "
             "teachers, so compression is not exact there; the gap above includes it." if inexact else "")
    prep = record["preprocessing"]
    inputs = (f"Inputs: {'×'.join(map(str, prep['input_size']))}, mean {prep['mean']}, std {prep['std']}, {prep['interpolation']} "
              f"resize, crop {prep['crop_pct']} (in {_PREPROCESSING_FILE[library]})." if prep is not None else
              "Inputs: as given to the merge (no image preprocessing was recorded).")
    ran = record["augmentation"]
    augmentation = ("Training stages read augmented inputs: " + ", ".join(f"{k} {v}" for k, v in ran.items())
                    + "; evaluation the eval transform." if ran else "No train-time augmentation.")
    k = len(record["teachers"])
    count, wide, share = ("two", "double-width", "half") if k == 2 else (str(k), f"{k}-wide", f"1/{k}")
    teacher_lines = "\n".join(_teacher_line(teacher_label(i).split()[-1], t) for i, t in enumerate(record["teachers"]))
    body = f"""
# {architecture} merged with hf_netmerge

This `{architecture}` was made by merging {count} teachers of the same architecture with the
method of *Merging of Neural Networks* (Pašen & Boža, 2024): the teachers were concatenated into a
{wide} big student, hard-concrete L0 gates learned which {share} of every channel group to keep,
the big student was compressed back to the teachers' architecture, and the result was fine-tuned.

## Teachers

{teacher_lines}

## Method and budget

| stage | epochs | optimizer steps | seconds |
|---|---|---|---|
{stages}

{_schedule(record)}
Function gap between the gated big student (eval) and the compressed student before fine-tuning: {gap}.{mixed}

{inputs} {augmentation}

## Gate statistics

{_gate_table(record)}

## Metrics

{measured}

{_usage(architecture, prep, library)}
## Merge config

```yaml
{yaml.safe_dump(cfg, sort_keys=True).strip()}
```

## Citation

```bibtex
{CITATION}
```
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}").content


def render_comparison_card(record: dict[str, Any]) -> str:
    """The README.md of ``compare``'s winner (``Comparison.record()``): the whole table of alternatives at the same budget,
    how each spent it, which one was chosen on validation and why."""
    architecture, metric, rows = record["architecture"], record["metric"], record["rows"]
    winner = next(r for r in rows if r["strategy"] == record["winner"])
    hub_ids = [t["reference"] if t["source"] == "hf-hub" else t["hub_origin"] for t in record["teachers"]
               if t["source"] == "hf-hub" or t.get("hub_origin")]
    relation = {"keep": None, "continue": "finetune", "distill": "finetune"}.get(record["winner"], "merge")
    results = [EvalResult(task_type="image-classification" if metric == "accuracy" else "tabular-regression", dataset_type=record["dataset"],
                          dataset_name=record["dataset"], metric_type=metric, metric_name=f"{metric} ({record['winner']})",
                          metric_value=winner["test"])] if winner["test"] is not None else []
    library = _format(record)
    data = ModelCardData(library_name=library, tags=["hf_netmerge", "model-merging", library], base_model=hub_ids or None,
                         base_model_relation=relation if hub_ids and relation else None,
                         model_name=f"{architecture}-netmerge-compare" if results else None, eval_results=results or None)
    lines = []
    for r in rows:
        chosen = " **(chosen)**" if r["strategy"] == record["winner"] else ""
        test = f"{r['test']:.4f}" if r["test"] is not None else ""
        lines.append(f"| {r['strategy']}{chosen} | {r['description']} | {r['validation']:.4f} | {test} | {r['epochs']:g} "
                     f"| {r['training_macs']:.3g} | {r['networks']} |")
    table = "\n".join(lines)
    student = next((r for r in rows if r["strategy"] == "student"), None)
    verdict = ("The merge won on validation." if record["winner"].startswith("student") else
               f"The merge did not win on validation: {record['winner']} did"
               + (f" ({winner['validation']:.4f} against the merge's {student['validation']:.4f})." if student else "."))
    teacher_lines = "\n".join(_teacher_line(teacher_label(i).split()[-1], t) for i, t in enumerate(record["teachers"]))
    body = f"""
# {architecture}: the best of the alternatives to merging, on {record["dataset"]}

Two given teachers and N = {record["epochs"]} more epochs each way: every alternative a holder of two checkpoints would
try, at the same budget, on the same data, chosen on a validation split ({metric}; the test column is held-out data
no choice saw). This network is **{record["winner"]}**. {verdict}

## Teachers

{teacher_lines}

## The comparison

| strategy | what it did | validation {metric} | test {metric} | epochs beyond the teachers | training multiply-adds | networks at inference |
|---|---|---|---|---|---|---|
{table}

The merge ran the **{record["preset"]}** schedule (config below) with N split into gate and fine-tune epochs.

{_usage(architecture, None, library)}
## Merge config

```yaml
{yaml.safe_dump(record["merge_config"], sort_keys=True).strip()}
```

## Citation

```bibtex
{CITATION}
```
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}").content
