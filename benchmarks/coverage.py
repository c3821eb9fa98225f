"""Which model families merge: one representative per timm family (its smallest variant by parameter count), or per
transformers image-classification model type (its default config).

    .venv/bin/python benchmarks/coverage.py [--families resnet vgg ...] [--max-params 30e6] [--workers 2] [--timeout 300]
    .venv/bin/python benchmarks/coverage.py --library transformers --max-params 1e8 --name coverage_transformers

Per family (a timm module), the variant with the fewest parameters (counted on the meta device), or per model type of
transformers' ``AutoModelForImageClassification`` the default config's model, is created twice from two seeds, its norms' affine parameters randomized and running statistics gathered on random data. Its channel
groups are resolved (declared by an adapter or traced); where they resolve, the big student's eval output is compared
with the teachers' mean, and the student compressed with half of each group open with the gated model, then loaded
with ``strict=True`` into a fresh model of the architecture. Outcome per family: ``exact`` (both within 1e-4 of the
output's scale), ``norm-gap`` (the big student exact and the student loading strictly, but compression not exact
because a LayerNorm over channels normalizes channels of both teachers together: the gap is measured and reported,
as ``merge_models`` reports it), ``inexact``, ``refused`` (a :class:`~hf_netmerge.NetMergeError`: its type and message) or ``crash``
(any other exception: a defect), or ``skipped`` (its smallest variant has over ``--max-params`` parameters: CPU time).
Each family runs in its own process (a timeout, and memory given back). Writes
``coverage.json`` and ``coverage.md`` into ``benchmarks/results/``; the family list is cached in ``--work-dir``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import timm
import torch
from _common import RESULTS, command, machine, target_table

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4
TARGET_EXACT, TARGET_CRASHES = 35, 0
OUTCOMES = ("exact", "norm-gap", "inexact", "crash", "timeout", "refused", "skipped")
MERGES = ("exact", "norm-gap")  # an exact big student and a strictly loading student
# Models the issue names besides the families' smallest variants (the CNNs people share most).
NAMED = ["seresnet18", "ecaresnet26t", "resnet50_gn", "efficientnet_b0", "mobilenetv3_small_100", "regnetx_002", "convnext_atto",
         "vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"]


def smallest_variants() -> dict[str, tuple[str, int]]:
    """Family (timm module) → its variant with the fewest parameters, counted without allocating (meta device)."""
    warnings.filterwarnings("ignore")
    families = {}
    for module in timm.list_modules():
        counts = []
        for name in timm.list_models(module=module):
            try:
                with torch.device("meta"):
                    counts.append((sum(p.numel() for p in timm.create_model(name).parameters()), name))
            except Exception:  # a variant that cannot be built bare (needs arguments): not a candidate
                continue
        if counts:
            count, name = min(counts)
            families[module] = (name, count)
    return families


def transformers_types() -> dict[str, tuple[str, int]]:
    """Model type → (``transformers:<type>``, parameters of its default config's image classifier, on the meta device)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    from hf_netmerge.formats import create_model

    warnings.filterwarnings("ignore")
    types = {}
    for model_type in sorted(MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES):
        try:
            with torch.device("meta"):
                count = sum(p.numel() for p in create_model(f"transformers:{model_type}", {}).parameters())
        except Exception:  # noqa: BLE001 (a type whose default config cannot be built bare: listed with 0 parameters)
            count = 0
        types[model_type] = (f"transformers:{model_type}", count)
    return types


def _teacher(name: str, seed: int) -> torch.nn.Module:
    """A fresh network of ``name`` with randomized norm parameters (ConvNeXt V2's response norms included)."""
    from hf_netmerge.formats import create_model
    from hf_netmerge.models.split_norm import response_norm_layout

    torch.manual_seed(seed)
    model = create_model(name, {})
    for m in model.modules():
        if isinstance(m, (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm)) and getattr(m, "weight", None) is not None:
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            if m.bias is not None:
                torch.nn.init.normal_(m.bias, std=0.5)
        elif response_norm_layout(m) is not None:
            torch.nn.init.normal_(m.weight, std=0.5)
            torch.nn.init.normal_(m.bias, std=0.5)
    return model


def _gather_statistics(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` after one train-mode pass on random data (real running statistics), in eval mode."""
    model.train()
    with torch.no_grad():
        model(_inputs(model, 4, 99))
    return model.eval()


def _inputs(model: torch.nn.Module, batch: int, seed: int) -> torch.Tensor:
    from hf_netmerge.data import Preprocessing

    shape = Preprocessing.for_model(model).input_size
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-6))


def check_family(family: str, name: str) -> dict[str, Any]:
    """The outcome of merging ``name``: exact / inexact / refused / crash, with the errors measured or the message."""
    import hf_netmerge as hm
    from hf_netmerge.adapters import resolve_spec
    from hf_netmerge.formats import create_model, logits

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    row: dict[str, Any] = {"family": family, "model": name}
    start = time.perf_counter()
    try:
        a, b = _teacher(name, 0), _teacher(name, 1)
        spec = resolve_spec(a)  # before any forward of the benchmark's own: a model that cannot read images is refused here
        a, b = _gather_statistics(a), _gather_statistics(b)
        x = _inputs(a, 2, 0)
        with torch.no_grad():
            big = hm.concatenate(a, b).eval()
            row["ensemble_error"] = _relative(logits(big(x)), (logits(a(x)) + logits(b(x))) / 2)
            gated = hm.add_gates(big)
            gen = torch.Generator().manual_seed(3)
            for gate in gated.gates.values():
                gate.log_alpha.copy_(torch.where(torch.randperm(gate.size, generator=gen) < gate.size // 2, 8.0, -8.0))
            gated.eval()
            student = hm.compress(gated).eval()
            row["compress_error"] = _relative(logits(student(x)), logits(gated(x)))
            fresh = create_model(name, {})
            fresh.load_state_dict(student.state_dict(), strict=True)
        row["groups"] = len(spec.groups)
        row["mixed_norm_groups"] = len(gated.mixed_norm_groups)
        big_exact, compress_exact = row["ensemble_error"] <= TOLERANCE, row["compress_error"] <= TOLERANCE
        norm_gap = big_exact and not compress_exact and gated.mixed_norm_groups
        row["outcome"] = "exact" if big_exact and compress_exact else "norm-gap" if norm_gap else "inexact"
    except hm.NetMergeError as e:
        row.update(outcome="refused", error=type(e).__name__, message=str(e).splitlines()[0][:300])
    except Exception as e:  # what the issue counts as a crash: any exception outside NetMergeError
        where = traceback.extract_tb(e.__traceback__)[-1]
        row.update(outcome="crash", error=type(e).__name__, message=f"{str(e).splitlines()[0][:250] if str(e) else ''} "
                   f"({Path(where.filename).name}:{where.lineno})")
    row["seconds"] = time.perf_counter() - start
    return row


def _check(args: tuple[str, str]) -> dict[str, Any]:
    return check_family(*args)


def _family(name: str) -> str:
    """The timm module that registers ``name``."""
    return next(module for module in timm.list_modules() if name in timm.list_models(module=module))


def _params(name: str) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in timm.create_model(name).parameters())


def _table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| family | model | params (M) | outcome | ensemble / compress error, or the error |", "|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (OUTCOMES.index(r["outcome"]), r["family"])):
        detail = (f"{r['ensemble_error']:.1e} / {r['compress_error']:.1e}" if "ensemble_error" in r and "compress_error" in r
                  else f"{r.get('error', '')}: {r.get('message', '')}".replace("|", "\\|"))
        lines.append(f"| {r['family']} | {r['model']} | {r['params'] / 1e6:.1f} | {r['outcome']} | {detail} |")
    return lines


def markdown(rows: list[dict[str, Any]], named: list[dict[str, Any]], library: str = "timm") -> str:
    tally = {o: sum(r["outcome"] == o for r in rows) for o in OUTCOMES}
    if library == "transformers":
        import transformers

        title = (f"# Coverage of transformers' image-classification model types ({len(rows)} types, transformers "
                 f"{transformers.__version__}, {machine()['cpu']})")
        chosen = "One model per type of `AutoModelForImageClassification` (its default config, at its `image_size`)"
    else:
        title = f"# Coverage of timm model families ({len(rows)} families, timm {timm.__version__}, {machine()['cpu']})"
        chosen = "One representative per family (the variant with the fewest parameters)"
    lines = [title, "", f"Command: `{command()}`", "",
             f"{chosen}, two teachers with randomized norm "
             f"parameters and real running statistics; exact = big student equal to the teachers' mean and compressed student "
             f"equal to the half-open gated model, both within {TOLERANCE:g} of the output's scale, and a strict load into "
             "a fresh model; norm-gap = the same except compression, which a LayerNorm over channels of both teachers makes "
             "inexact (the error shown; `merge_models` measures and reports it).", "",
             " · ".join(f"{o}: {n}" for o, n in tally.items()), "",
             *(target_table([(f"families with an exact big student and a strictly loading student ≥ {TARGET_EXACT}",
                               str(merging := sum(tally[o] for o in MERGES)), merging >= TARGET_EXACT),
                              (f"crashes (exceptions outside NetMergeError) = {TARGET_CRASHES}", str(tally["crash"]),
                               tally["crash"] == TARGET_CRASHES)]) if library == "timm" else []),
             *_table(rows), *(["", "## Named models", "", *_table(named)] if named else [])]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", choices=["timm", "transformers"], default="timm", help="whose families to check")
    parser.add_argument("--families", nargs="*", help="only these timm modules or transformers model types (default: all)")
    parser.add_argument("--named", nargs="*", help="timm models checked besides the families' smallest variants (default: "
                        f"{' '.join(NAMED)}; none for transformers)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per family before it counts as a timeout")
    parser.add_argument("--max-params", type=float, default=30e6, help="skip families whose smallest variant is larger")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "bench-coverage")
    parser.add_argument("--name", default="coverage")
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if args.library == "transformers":
        counts, ours, named_models = transformers_types(), set(), args.named or []
    else:
        cached = args.work_dir / f"families-timm{timm.__version__}.json"
        if not cached.is_file():
            cached.write_text(json.dumps(smallest_variants(), indent=1))
        counts = {k: tuple(v) for k, v in json.loads(cached.read_text()).items()}
        ours = {m for m in timm.list_modules() if all(n.startswith("netmerge_") for n in timm.list_models(module=m))}  # hf_netmerge's own
        named_models = NAMED if args.named is None else args.named
    families = {k: v for k, v in counts.items() if k not in ours and (not args.families or k in args.families)}
    jobs = [(family, name, count) for family, (name, count) in families.items() if count <= args.max_params]
    skipped = [{"family": family, "model": name, "params": count, "outcome": "skipped", "error": "skipped",
                "message": f"over {args.max_params / 1e6:g}M parameters"} for family, (name, count) in families.items() if count > args.max_params]
    jobs += [(f"{_family(name)} (named)", name, _params(name)) for name in named_models]
    rows = []
    with multiprocessing.get_context("spawn").Pool(args.workers, maxtasksperchild=1) as pool:
        pending = [(job, pool.apply_async(_check, (job[:2],))) for job in jobs]
        for (family, name, count), result in pending:
            try:
                row = result.get(timeout=args.timeout)
            except multiprocessing.TimeoutError:
                row = {"family": family, "model": name, "outcome": "timeout", "error": "timeout", "message": f"over {args.timeout:.0f} s"}
            row["params"] = count
            rows.append(row)
            print(f"{family}: {row['outcome']} {row.get('error', '')} {row.get('message', '')}"[:200], flush=True)
    named = [r for r in rows if r["family"].endswith("(named)")]
    rows = [r for r in rows if not r["family"].endswith("(named)")] + skipped
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"command": command(), "machine": machine(), "library": args.library,
                                                         "tolerance": TOLERANCE, "rows": rows, "named": named}, indent=1))
    (RESULTS / f"{args.name}.md").write_text(markdown(rows, named, args.library))
    print((RESULTS / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
