"""GPU: ResNet20 (CIFAR-style 32×32 input) or VGG11 merged in bf16 at a reduced budget, with throughput against a plain loop.

    .venv/bin/python benchmarks/gpu.py [--recipe recipes/resnet20-cifar100.yaml] [--epochs-scale 0.05]
                                       [--dataset synthetic|cifar100|PATH] [--seeds 1]

The recipe's epochs are scaled by ``--epochs-scale`` (at least one per stage, the learning-rate drops in
proportion). ``--dataset synthetic`` (the default, as the GPU machines have no network) makes CIFAR-shaped
class-prototype images, so its accuracies only show that training works; ``cifar100``/``cifar10`` or a
local ``save_to_disk`` directory give real ones. Throughput: samples/s of the stage runner and of a plain
bf16 loop on the same teacher model, data (in GPU memory) and batch, and of the gate stage. Writes
``gpu.json``, ``gpu.md`` and ``gpu.png`` into ``benchmarks/results/`` with the GPU's name. Refuses to run without a
GPU unless ``--allow-cpu`` (used to check the script on small settings).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import timm
import torch
import torch.nn.functional as F
from _common import RESULTS, bar_chart, command, machine

import hf_netmerge as hm
from hf_netmerge.config import StageConfig
from hf_netmerge.data import TensorBatchDataset, load_data, make_loader, prepare_dataset, split
from hf_netmerge.experiments import Budgets, RecipeConfig, SeedData, Timer, load_recipe, run_seed, scale_recipe
from hf_netmerge.experiments.report import stats
from hf_netmerge.gates import GateRegularizer
from hf_netmerge.training import make_accelerator, train_stage


def synthetic(num_classes: int, size: int, seed: int, device: torch.device) -> TensorBatchDataset:
    """CIFAR-shaped images: a smooth random prototype per class plus noise."""
    gen = torch.Generator().manual_seed(1234)
    prototypes = F.interpolate(torch.randn(num_classes, 3, 8, 8, generator=gen), size=32, mode="bilinear")
    gen.manual_seed(seed)
    labels = torch.randint(0, num_classes, (size,), generator=gen)
    images = prototypes[labels] + 1.5 * torch.randn(size, 3, 32, 32, generator=gen)
    return TensorBatchDataset(images.to(device), labels.to(device))


def real(name: str, recipe: RecipeConfig, device: torch.device) -> tuple[TensorBatchDataset, TensorBatchDataset]:
    """A named or local image dataset through the model's timm transform, decoded once into device memory."""
    loaded = load_data(name)
    probe = timm.create_model(recipe.architecture, **recipe.model_args)
    sets = []
    for part in (loaded.train, loaded.eval):
        ds = prepare_dataset(part, model=probe, task="classification", num_classes=probe.num_classes, image_size=32)
        batches = list(make_loader(ds, 1024, shuffle=False))
        sets.append(TensorBatchDataset(torch.cat([x for x, _ in batches]).to(device), torch.cat([y for _, y in batches]).to(device)))
    return sets[0], sets[1]


def plain_loop(model: torch.nn.Module, data: TensorBatchDataset, epochs: int, batch: int, lr: float, bf16: bool) -> float:
    """Samples/s of a textbook loop: shuffle, slice, forward (under bf16 autocast when ``bf16``), backward, SGD."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    device = data.inputs.device
    torch.cuda.synchronize() if device.type == "cuda" else None
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(data), device=device)
        for i in range(0, len(data), batch):
            index = order[i : i + batch]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(model(data.inputs[index]).float(), data.targets[index])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    torch.cuda.synchronize() if device.type == "cuda" else None
    return epochs * len(data) / (time.perf_counter() - start)


def throughput_stage(recipe: RecipeConfig, epochs: int) -> StageConfig:
    """The teacher stage at a constant learning rate for ``epochs`` epochs: what the throughput runs train."""
    return dataclasses.replace(recipe.teacher, epochs=epochs, milestones=[], warmup_epochs=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="resnet20-cifar100", help="a packaged recipe name or a recipe file")
    parser.add_argument("--epochs-scale", type=float, default=0.05)
    parser.add_argument("--dataset", default="synthetic")
    parser.add_argument("--train-samples", type=int, default=50_000, help="synthetic training images")
    parser.add_argument("--test-samples", type=int, default=10_000, help="synthetic test images")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--throughput-epochs", type=int, default=2)
    parser.add_argument("--allow-cpu", action="store_true")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.allow_cpu:
        sys.exit("benchmarks/gpu.py needs a CUDA GPU (pass --allow-cpu to check the script on small settings)")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    recipe = scale_recipe(load_recipe(args.recipe, args.overrides), args.epochs_scale)
    num_classes = int(recipe.model_args.get("num_classes", 1000))
    if args.dataset == "synthetic":
        train, test = synthetic(num_classes, args.train_samples, 0, device), synthetic(num_classes, args.test_samples, 1, device)
    else:
        train, test = real(args.dataset, recipe, device)
    train, val = split(train, recipe.data.val_fraction, seed=0)
    accelerator = make_accelerator(recipe.mixed_precision)
    teacher = timm.create_model(recipe.architecture, **recipe.model_args).to(device)
    plain = plain_loop(teacher, train, args.throughput_epochs, recipe.batch_size, recipe.teacher.lr, recipe.mixed_precision == "bf16")
    stage = throughput_stage(recipe, args.throughput_epochs)
    ours = train_stage(timm.create_model(recipe.architecture, **recipe.model_args), make_loader(train, recipe.batch_size, True), stage,
                       task="classification", accelerator=accelerator, name="runner", progress=False)
    pair = [timm.create_model(recipe.architecture, **recipe.model_args) for _ in range(2)]
    gated = hm.add_gates(hm.concatenate(*pair))
    gate = train_stage(gated, make_loader(train, recipe.batch_size, True), stage, task="classification", accelerator=accelerator,
                       name="gates", regularizer=GateRegularizer(gated, 0.01, 0.05), progress=False)
    throughput = {"plain_samples_per_s": plain, "runner_samples_per_s": ours.samples / ours.seconds,
                  "gate_samples_per_s": gate.samples / gate.seconds}
    throughput["runner_over_plain"] = throughput["runner_samples_per_s"] / plain
    throughput["gate_epoch_over_teacher_epoch"] = throughput["runner_samples_per_s"] / throughput["gate_samples_per_s"]
    del gated, pair
    data = SeedData(train=train, val=val, test=test, name=args.dataset)
    runs = [run_seed(recipe, seed, data=data, accelerator=accelerator, observers=[Timer(), Budgets()], progress=False).row
            for seed in range(args.seeds)]
    strategies = ["student", *recipe.baselines, "ensemble", "teacher_a", "teacher_b"]
    summary = {name: stats([r[name] for r in runs]) for name in strategies}
    result = {"command": command(), "machine": machine(), "dataset": args.dataset, "recipe": recipe.to_dict(),
              "throughput": throughput, "summary": summary, "runs": [{k: v for k, v in r.items() if k != "curves"} for r in runs]}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gpu.json").write_text(json.dumps(result, indent=1))
    gpu = result["machine"]["gpu"] or "no GPU (CPU check)"
    lines = [f"# {recipe.architecture} on {args.dataset}, {recipe.mixed_precision}, epochs × {args.epochs_scale} ({gpu})", "",
             f"Command: `{command()}`", "",
             f"Throughput (samples/s, batch {recipe.batch_size}): plain loop {plain:.0f}, runner {throughput['runner_samples_per_s']:.0f} "
             f"(×{throughput['runner_over_plain']:.2f}), gate stage {throughput['gate_samples_per_s']:.0f} "
             f"(a gate epoch costs {throughput['gate_epoch_over_teacher_epoch']:.2f} teacher epochs).", "",
             "| strategy | mean test accuracy | min | max | seeds |", "|---|---|---|---|---|"]
    lines += [f"| {n} | {summary[n]['mean']:.4f} | {summary[n]['min']:.4f} | {summary[n]['max']:.4f} | {summary[n]['n']} |"
              for n in strategies]
    (RESULTS / "gpu.md").write_text("\n".join(lines) + "\n")
    bar_chart(RESULTS / "gpu.png", [(f"samples/s ({gpu})", {"plain loop": plain, "runner": throughput["runner_samples_per_s"],
                                                           "gate stage": throughput["gate_samples_per_s"]}, None),
                                    ("mean test accuracy", {n: summary[n]["mean"] for n in strategies}, None)])
    print((RESULTS / "gpu.md").read_text())


if __name__ == "__main__":
    main()
