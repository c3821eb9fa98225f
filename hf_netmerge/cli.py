"""Command line ``hf-netmerge`` (also ``python -m hf_netmerge``): ``demo``, ``merge``, ``compare``, ``push``, ``run``, ``inspect``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .config import MergeConfig
from ._version import __version__
from .errors import ConfigError, NetMergeError, StageInterrupted
from .overrides import apply_overrides
from .spec import ChannelGroup, MergeSpec

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from .data.named import NamedData
    from .experiments import RecipeConfig


DATASET_HELP = ("built in: sine, fashion_mnist, mnist (no download); or a save_to_disk directory, an image folder, or a Hub "
                "dataset id or alias (cifar10, cifar100, imagewoof, imagenet)")


class _ListKeys(argparse.Action):
    """``--list-keys``: every ``--set`` key of MergeConfig with its default, then exit (no other argument needed)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, help="list every --set KEY with its default and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        rows = _dotted(MergeConfig().to_dict())
        width = max(len(k) for k in rows)
        print("\n".join(f"{k:<{width}}  {v!r}" for k, v in rows.items() if k.rsplit(".", 1)[-1] != "version"))
        parser.exit()


class _ListRecipes(argparse.Action):
    """``run --list``: the packaged recipes' names, then exit."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, help="list the packaged recipes and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        from .experiments.recipe import available_recipes

        print("\n".join(available_recipes()))
        parser.exit()


def _dotted(values: dict, prefix: str = "") -> dict[str, object]:
    """``{"augment": {"mode": "auto"}}`` → ``{"augment.mode": "auto"}``: the keys ``--set`` takes."""
    flat: dict[str, object] = {}
    for key, value in values.items():
        flat.update(_dotted(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


def _demo(args: argparse.Namespace) -> int:
    from .experiments.demo import DemoConfig, run_demo

    if args.seeds < 1 or args.epochs_scale <= 0:
        raise NetMergeError("--seeds must be >= 1 and --epochs-scale > 0")
    cfg = DemoConfig(
        seeds=args.seeds,
        first_seed=args.first_seed,
        epochs_scale=args.epochs_scale,
        threads=args.threads,
        output_dir=args.output_dir,
        stacked=not args.sequential,
    )
    run_demo(cfg, progress=not args.no_progress)
    return 0


def _merge_config(args: argparse.Namespace, task: str) -> MergeConfig:
    """Defaults, then the data's task, then ``--config``, then the flags (``--augment``, ``--num-workers``,
    ``--max-eval-samples``, ``--compile``, ``--channels-last``), then ``--set key=value``."""
    values: dict = {"task": task}
    if args.config:
        values.update(MergeConfig.from_yaml(args.config).to_dict())
    if args.augment is not None:
        values["augment"] = {**values.get("augment", {}), "mode": args.augment}
    if args.num_workers is not None:
        values["num_workers"] = args.num_workers
    if getattr(args, "max_eval_samples", None) is not None:
        values["eval_max_samples"] = args.max_eval_samples
    values.update(_speed_flags(args))
    return MergeConfig.from_dict(apply_overrides(values, args.set))


def _speed_flags(args: argparse.Namespace) -> dict[str, str | bool]:
    """The config fields that ``--compile`` and ``--channels-last`` set (none when they are absent)."""
    values: dict[str, str | bool] = {}
    if args.compile is not None:
        values["compile"] = args.compile
    if args.channels_last:
        values["channels_last"] = True
    return values


def _inputs(args: argparse.Namespace) -> tuple[NamedData, MergeConfig, Dataset]:
    """What ``merge`` and ``compare`` read, checked before anything trains: a free output directory, the thread count,
    the dataset, the config (its task from the data) and the first ``--max-train-samples`` training examples."""
    import torch

    from .data import first_examples, load_data
    from .files import check_output_dir

    if args.output_dir:
        check_output_dir(args.output_dir, args.overwrite)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    data = load_data(args.dataset)
    config = _merge_config(args, data.task)
    return data, config, data.train if args.max_train_samples is None else first_examples(data.train, args.max_train_samples)


def _merge(args: argparse.Namespace) -> int:
    from accelerate.state import PartialState

    from .api import LoadOptions, OutputOptions, RunOptions, merge_models
    from .data.named import hub_dataset_id
    from .hub import push_folder
    from .training import make_accelerator, on_main_process

    if len(args.teachers) < 2:
        raise ConfigError(f"merge needs at least two teachers, got {len(args.teachers)}")
    data, config, train = _inputs(args)
    accelerator = None
    if args.log_with:  # beside the output directory, which the final save replaces as a whole
        accelerator = make_accelerator(config.mixed_precision, gradient_accumulation_steps=config.gradient_accumulation_steps,
                                       log_with=args.log_with, project_dir=f"{Path(args.output_dir)}.logs")
        accelerator.init_trackers("hf_netmerge-merge", config={"merge_config": config.to_json()})
    result = merge_models(
        args.teachers[0],
        args.teachers[1],
        train,
        data.eval,
        config,
        more_teachers=args.teachers[2:],
        load=LoadOptions(architecture=args.architecture, allow_pickle=args.allow_pickle),
        output=OutputOptions(args.output_dir, overwrite=args.overwrite, license=args.license,
                             datasets=[hub_id] if (hub_id := hub_dataset_id(args.dataset)) else None),
        run=RunOptions(accelerator=accelerator, progress=not args.no_progress, checkpoint_dir=args.checkpoint_dir),
    )
    if accelerator is not None:
        accelerator.end_training()
    main_process = PartialState().is_main_process  # under accelerate launch, one table and one push
    if main_process:
        for name, values in result.metrics.items():
            print(f"{name:<24} " + "  ".join(f"{k} {v:.4f}" for k, v in values.items()))
        print(f"saved the student to {args.output_dir}")
    if args.push_to_hub:
        url = on_main_process(lambda: push_folder(Path(args.output_dir), args.push_to_hub, private=args.private or None))
        if main_process:
            print(f"pushed: {url}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from .api import LoadOptions
    from .experiments.compare import compare_models

    data, config, train = _inputs(args)
    comparison = compare_models(args.teachers[0], args.teachers[1], train, data.eval, epochs=args.epochs, config=config,
                                val_fraction=args.val_fraction, load=LoadOptions(architecture=args.architecture, allow_pickle=args.allow_pickle),
                                dataset_name=data.name, output=args.output_dir, overwrite=args.overwrite, progress=not args.no_progress,
                                strategies=args.strategies)
    print(comparison.table())
    if args.output_dir:
        print(f"saved {comparison.winner} to {args.output_dir}")
    return 0


def _push(args: argparse.Namespace) -> int:
    from .formats import check_student_dir
    from .hub import push_folder

    folder = check_student_dir(args.directory)
    print(f"pushed: {push_folder(folder, args.repo_id, private=args.private or None, revision=args.revision)}")
    return 0


def _recipe(args: argparse.Namespace) -> RecipeConfig:
    """The recipe ``run`` names, with ``--compile`` / ``--channels-last`` / ``--threads``, then the ``key=value`` overrides."""
    from .experiments import load_recipe

    flags = {**_speed_flags(args), **({"threads": args.threads} if args.threads is not None else {})}
    return load_recipe(args.recipe, [*(f"{key}={str(value).lower()}" for key, value in flags.items()), *args.overrides])


def _run(args: argparse.Namespace) -> int:
    from .experiments import run_recipe

    recipe = _recipe(args)
    run_recipe(recipe, args.output_dir or f"runs/{recipe.name}", overwrite=args.overwrite, progress=not args.no_progress)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .adapters import resolve_spec
    from .formats import create_model, format_for_architecture
    from .hub import load_teacher

    if format_for_architecture(args.model).handles(args.model):
        model = create_model(args.model, {"num_classes": args.num_classes})
    else:
        model, _ = load_teacher(args.model)
    spec = resolve_spec(model, discover=args.discover)
    print(format_spec(spec))
    return 0


def format_spec(spec: MergeSpec) -> str:
    """The channel groups as readable text: name, size, source, then the modules in each role."""
    lines = [f"{spec.architecture}: {len(spec.groups)} channel groups; input layer {spec.input_layer}, head {spec.output_layer}"]
    for g in spec.groups:
        consumers = [c.module + (f" (x{c.expansion})" if c.expansion > 1 else "") + (f" @{c.offset}" if c.offset else "")
                     for c in g.consumers]
        unit = f"  unit {g.unit}" if g.unit > 1 else ""
        tied = f"  tied to {g.tied}" if g.tied else ""
        lines.append(f"\n{g.name}  size {g.size}{unit}{tied}  [{g.source}]")
        roles = (("producers", _at(g, g.producers)), ("norms", _at(g, g.norms)), ("grouped", _at(g, g.channelwise)),
                 ("scales", _at(g, g.scales)), ("consumers", consumers),
                 ("gates at", _at(g, g.gate_sites)))
        for role, names in roles:
            lines.append(f"  {role:<10} {', '.join(names) if names else '-'}")
    if spec.widths:  # attributes a forward splits by, k times wider in a big student
        lines.append("")
        lines += [f"width {w.path} = {w.value}" for w in spec.widths]
    return "\n".join(lines)


def _at(group: ChannelGroup, names: tuple[str, ...]) -> list[str]:
    """``names`` with `` @offset`` where the group starts among a module's channels after a split or a concatenation."""
    return [n + (f" @{','.join(map(str, offsets))}" if (offsets := group.offsets_of(n)) != (0,) else "") for n in dict.fromkeys(names)]


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_speed_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=_positive, help="torch CPU threads (default: torch's, all cores)")
    parser.add_argument("--compile", nargs="?", const="default", choices=["default", "reduce-overhead", "max-autotune"],
                        help="train every stage through torch.compile in this mode (default mode when given alone)")
    parser.add_argument("--channels-last", action="store_true", help="train conv nets in the channels_last memory format")


def build_parser() -> argparse.ArgumentParser:
    """The ``hf-netmerge`` argument parser."""
    parser = argparse.ArgumentParser(prog="hf-netmerge", description="Merge two networks of one architecture into one.")
    parser.add_argument("--version", action="version", version=f"hf-netmerge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    defaults = __import__("hf_netmerge.experiments.demo", fromlist=["DemoConfig"]).DemoConfig()
    demo = sub.add_parser("demo", help="the paper's sine problem end to end: teachers, merge, fine-tune, bo3 and one-model baselines")
    demo.add_argument("--seeds", type=int, default=defaults.seeds, help=f"number of seeds (default {defaults.seeds})")
    demo.add_argument("--first-seed", type=int, default=defaults.first_seed, help="first seed (default 0)")
    demo.add_argument(
        "--epochs-scale",
        type=float,
        default=defaults.epochs_scale,
        help=f"fraction of the paper's 900 epochs per strategy (default {defaults.epochs_scale}; 1 = the paper's budget)",
    )
    demo.add_argument("--threads", type=int, default=defaults.threads, help="torch CPU threads (default 1)")
    demo.add_argument("--output-dir", default=defaults.output_dir, help=f"where results go (default {defaults.output_dir}/)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.add_argument("--sequential", action="store_true",
                      help="train the seeds one after another (default: stacked, every stage of all seeds as one model)")
    demo.set_defaults(func=_demo)

    merge = sub.add_parser("merge", help="merge two (or more) existing checkpoints and save (and optionally publish) the student")
    merge.add_argument("teachers", nargs="+", metavar="TEACHER",
                       help="two or more local directories (timm's or transformers' layout), Hub ids (id@revision) or .safetensors files")
    merge.add_argument("--dataset", required=True, help=DATASET_HELP)
    merge.add_argument("--output-dir", required=True, help="where the student is saved (the teachers' format + model card)")
    merge.add_argument("--config", help="a MergeConfig YAML file")
    merge.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one MergeConfig field (see --list-keys)")
    merge.add_argument("--list-keys", action=_ListKeys)
    merge.add_argument("--augment", choices=["auto", "none"], help="train-time augmentation (default auto; knobs: --set augment.hflip=0)")
    merge.add_argument("--num-workers", type=int, help="DataLoader worker processes that decode images (default 0)")
    merge.add_argument("--max-train-samples", type=_positive, help="train on the first N training examples only")
    merge.add_argument("--max-eval-samples", type=_positive, help="evaluate on the first N evaluation examples only")
    merge.add_argument("--log-with", nargs="+", choices=["tensorboard"],
                       help="trackers for every stage's loss, learning rate, throughput, λ and P[g>0] (under OUTPUT_DIR.logs)")
    _add_speed_flags(merge)
    merge.add_argument("--architecture", help="architecture of .safetensors teacher files (timm name or transformers:<model_type>)")
    merge.add_argument("--allow-pickle", action="store_true", help="read pickle teachers with torch.load(weights_only=True)")
    merge.add_argument("--push-to-hub", metavar="REPO_ID", help="publish the student to this Hub repo in one commit")
    merge.add_argument("--private", action="store_true", help="create the Hub repo as private")
    merge.add_argument("--license", help="the student card's license (default: the one both teachers' cards declare)")
    merge.add_argument("--checkpoint-dir", help="stage checkpoints every epoch; rerunning the same command resumes from them")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    merge.add_argument("--no-progress", action="store_true", help="no progress bars")
    merge.set_defaults(func=_merge)

    compare = sub.add_parser("compare", help="should I merge? every alternative at N more epochs on your data, chosen on validation")
    compare.add_argument("teachers", nargs=2, metavar="TEACHER",
                         help="two local directories (timm's or transformers' layout), Hub ids (id@revision) or .safetensors files")
    compare.add_argument("--dataset", required=True, help=DATASET_HELP)
    compare.add_argument("--epochs", type=_positive, required=True, help="the extra epochs every alternative gets (at least 2)")
    compare.add_argument("--output-dir", help="where the winner is saved (the teachers' format + a card with the whole table)")
    compare.add_argument("--strategies", nargs="+", metavar="NAME", help="run only these alternatives (continue, distill, "
                         "weight_matching, student, student_paper, ensemble; default all; keep is always scored)")
    compare.add_argument("--val-fraction", type=float, default=0.1, help="share of the training split every choice is made on (0.1)")
    compare.add_argument("--config", help="a MergeConfig YAML file (the merge's schedule; batch size, precision, augmentation for all)")
    compare.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one MergeConfig field (see --list-keys)")
    compare.add_argument("--list-keys", action=_ListKeys)
    compare.add_argument("--augment", choices=["auto", "none"], help="train-time augmentation (default auto)")
    compare.add_argument("--num-workers", type=int, help="DataLoader worker processes that decode images (default 0)")
    compare.add_argument("--max-train-samples", type=_positive, help="use the first N training examples only")
    _add_speed_flags(compare)
    compare.add_argument("--architecture", help="architecture of .safetensors teacher files (timm name or transformers:<model_type>)")
    compare.add_argument("--allow-pickle", action="store_true", help="read pickle teachers with torch.load(weights_only=True)")
    compare.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    compare.add_argument("--no-progress", action="store_true", help="no progress bars")
    compare.set_defaults(func=_compare)

    push = sub.add_parser("push", help="publish a saved student (merge --output-dir) to the Hub in one commit, without retraining")
    push.add_argument("directory", help="a directory written by merge --output-dir or MergeResult.save_pretrained")
    push.add_argument("repo_id", help="the Hub repo (created if needed)")
    push.add_argument("--revision", help="a branch to commit to (created from main if needed)")
    push.add_argument("--private", action="store_true", help="create the Hub repo as private")
    push.set_defaults(func=_push)

    run = sub.add_parser("run", help="a whole experiment from a recipe: teachers, merge, fine-tune, baselines")
    run.add_argument("recipe", help="a recipe YAML file, or the name of a packaged recipe (sine, resnet20-cifar100, ...)")
    run.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. seeds=[0,1] merge.gate_epochs=3")
    run.add_argument("--output-dir", help="where checkpoints and results go (default runs/<recipe name>); rerun to resume")
    _add_speed_flags(run)
    run.add_argument("--overwrite", action="store_true", help="replace an output directory holding another run")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("--list", action=_ListRecipes)
    run.set_defaults(func=_run)

    inspect = sub.add_parser("inspect", help="print a model's channel groups: what is coupled and where gates go")
    inspect.add_argument("model", help="a timm architecture name, transformers:<model_type>, a local directory or a Hub id")
    inspect.add_argument("--num-classes", type=int, default=10, help="classes when MODEL is an architecture name (default 10)")
    inspect.add_argument("--discover", action="store_true", help="trace the groups even where an adapter declares them")
    inspect.set_defaults(func=_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; exit code 0 on success, 2 on a refused input."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except NetMergeError as e:
        print(f"hf-netmerge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"hf-netmerge: interrupted: {_interruption(args, e)}", file=sys.stderr)
        return 130


def _interruption(args: argparse.Namespace, error: KeyboardInterrupt) -> str:
    """One line for Ctrl-C: what was interrupted and what was kept (nothing is ever left half-written)."""
    where = (f"{args.command}, stage {error.stage!r} in epoch {error.epoch} of {error.epochs}"
             if isinstance(error, StageInterrupted) else args.command)
    kept = []
    if isinstance(error, StageInterrupted) and error.checkpoint is not None:
        kept.append(f"the checkpoint {error.checkpoint} is kept: rerun the same command to resume")
    elif getattr(args, "checkpoint_dir", None) is not None:
        kept.append(f"the checkpoints of the finished stages in {args.checkpoint_dir} are kept: rerun the same command to resume")
    elif args.command == "merge":
        kept.append("no checkpoint (pass --checkpoint-dir to make a merge resumable)")
    out = getattr(args, "output_dir", None)
    if out and args.command in ("merge", "compare"):
        kept.append(f"{out} holds the complete result" if Path(out).is_dir() else f"nothing was written to {out}")
    return f"{where}; " + "; ".join(kept) if kept else where


if __name__ == "__main__":
    sys.exit(main())
