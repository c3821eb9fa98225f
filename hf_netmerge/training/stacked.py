"""Stacked training: many independent small networks of one architecture trained as one model (``torch.func``).

Each step, every network reads its own batch (its own loader: dataset, shuffle), the networks' forward passes run as
one ``vmap`` of ``functional_call`` over their stacked parameters, and their losses (task loss plus each one's
weighted regularizer penalty) are summed, so one backward pass gives every network exactly its own gradient.
Weights get SGD with momentum at each network's own learning rate (its own stage's schedule, elementwise as
``torch.optim.SGD``); a regularizer's parameters get its optimizer class run on the stacked tensors (elementwise too).
A network whose stage ends, or whose loss turns non-finite, leaves the stack. What a network gets is what
:func:`~hf_netmerge.training.train_stage` gives it alone, to float rounding; a small model's per-step overhead
(a sine-MLP step is almost all per-operation overhead) is paid once for the whole stack. Over hundreds of steps,
rounding can flip a hard-concrete clamp, so a gated network may drift from its one-by-one twin: stacked runs agree
with sequential ones in distribution, not bit for bit.

:class:`StackingTrainer` is the :data:`~hf_netmerge.training.runner.Trainer` that gathers the jobs of code written for
one network at a time (one seed's strategies), run in threads, into such stacks.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn
from torch.func import functional_call, vmap
from tqdm.auto import tqdm

from ..data import TensorLoader
from ..errors import NonFiniteLossError
from ..formats import logits
from .runner import Regularizer, StageJob, StageReport, _set_epoch, lr_factor, task_loss

T = TypeVar("T")
U = TypeVar("U")


def unstackable(job: StageJob) -> str | None:
    """Why ``job`` cannot join a stack (it then trains alone, by :func:`~hf_netmerge.training.train_stage`), or None."""
    accelerator = job.accelerator
    reasons = [
        (not isinstance(job.loader, TensorLoader), "its data is not in-memory tensors"),
        (accelerator.num_processes != 1, "it runs in several processes"),
        (accelerator.gradient_accumulation_steps != 1, "it accumulates gradients"),
        (accelerator.mixed_precision != "no", "it trains in mixed precision"),
        (job.checkpoint is not None, "it checkpoints"),
        (job.distillation is not None, "it distills"),
        (job.compile_mode != "no" or job.channels_last, "it compiles or trains channels-last"),
        (job.stage.max_grad_norm is not None, "it clips gradients"),
        (job.regularizer is not None and job.regularizer.prepares_model, "its gates close on a schedule"),
        (any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in job.model.modules()), "its model draws dropout"),
        (any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in job.model.modules()), "its model has BatchNorm"),
    ]
    return next((reason for failed, reason in reasons if failed), None)


def _optimizer_kind(regularizer: Regularizer | None) -> Hashable:
    if regularizer is None:
        return None
    optimizer = regularizer.optimizer()
    return type(regularizer), type(optimizer), tuple(sorted((k, repr(v)) for k, v in optimizer.defaults.items()))


def stack_key(job: StageJob) -> Hashable:
    """Jobs with equal keys can share a stack: one architecture (parameter and buffer shapes), batch size, dataset
    size, task, device, momentum and weight decay, and regularizer kind. Epochs and learning-rate schedules may differ."""
    model = job.model
    return (
        type(model),
        tuple((n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in model.named_parameters()),
        tuple((n, tuple(b.shape), b.dtype) for n, b in model.named_buffers()),
        job.loader.batch_size,
        len(job.loader.dataset),
        job.task,
        str(job.accelerator.device),
        job.stage.momentum,
        job.stage.weight_decay,
        _optimizer_kind(job.regularizer),
    )


class _Objective(nn.Module):
    """One network's step loss and penalty; ``functional_call`` swaps each network's parameters into ``model`` (and so
    into what its regularizer reads)."""

    def __init__(self, model: nn.Module, task: str, regularizer: Regularizer | None) -> None:
        super().__init__()
        self.model, self.task = model, task
        object.__setattr__(self, "regularizer", regularizer)  # reads self.model; not a submodule

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss = task_loss(self.task, logits(self.model(inputs)), targets)
        penalty = self.regularizer.penalty() if self.regularizer is not None else loss.new_zeros(())
        return loss, penalty


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    prefix, _, attr = name.rpartition(".")
    return model.get_submodule(prefix), attr


class _Data:
    """Every job's dataset in one tensor (distinct datasets stacked once), so a step's batches are one gather."""

    def __init__(self, jobs: Sequence[StageJob], device: torch.device) -> None:
        datasets = [job.loader.dataset for job in jobs]
        distinct = list({id(d): d for d in datasets}.values())
        self.datasets = datasets
        self.augmented = any(getattr(d, "augment", None) is not None for d in distinct)
        self.device = device
        if not self.augmented:
            position = {id(d): k for k, d in enumerate(distinct)}
            self.which = torch.tensor([position[id(d)] for d in datasets], device=device)
            self.inputs = torch.stack([d.inputs for d in distinct]).to(device)
            self.targets = torch.stack([d.targets for d in distinct]).to(device)

    def batch(self, members: list[int], index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(S, b, ...)`` inputs and targets: member ``members[k]`` reads its examples ``index[k]``."""
        if self.augmented:
            pairs = [self.datasets[i].__getitems__(index[k].cpu()) for k, i in enumerate(members)]
            return torch.stack([x for x, _ in pairs]).to(self.device), torch.stack([y for _, y in pairs]).to(self.device)
        which = self.which[members][:, None] if len(members) != len(self.which) else self.which[:, None]
        return self.inputs[which, index], self.targets[which, index]


@dataclass
class _Stack:
    """The stacked tensors of the networks ``members`` (indices into the jobs), linked to their modules: each module's
    parameters and buffers are views of its row, so the modules (and their regularizers) see every update."""

    jobs: Sequence[StageJob]
    members: list[int]
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    momentum: dict[str, torch.Tensor] = field(default_factory=dict)
    weights: list[str] = field(default_factory=list)
    extra: torch.optim.Optimizer | None = None

    def __post_init__(self) -> None:
        if not self.members:
            return
        models = [self.jobs[i].model for i in self.members]
        base = models[0]
        for name, p in base.named_parameters():
            self.params[name] = torch.stack([m.get_parameter(name).detach() for m in models]).requires_grad_(p.requires_grad)
        for name, _ in base.named_buffers():
            self.buffers[name] = torch.stack([m.get_buffer(name) for m in models])
        self._link()
        regularizer = self.jobs[self.members[0]].regularizer
        ids = {id(p) for p in regularizer.parameters()} if regularizer is not None else set()
        extra = [n for n, p in base.named_parameters() if id(p) in ids]  # stepped by the regularizer's optimizer, not SGD
        self.weights = [n for n, p in self.params.items() if p.requires_grad and n not in extra]
        if regularizer is not None:
            template = regularizer.optimizer()
            self.extra = type(template)([self.params[n] for n in extra], **template.defaults)

    def _link(self) -> None:
        for row, i in enumerate(self.members):
            model = self.jobs[i].model
            for name, stacked in self.params.items():
                model.get_parameter(name).data = stacked.detach()[row]
            for name, stacked in self.buffers.items():
                owner, attr = _owner(model, name)
                owner._buffers[attr] = stacked[row]

    def release(self, rows: list[int]) -> None:
        """Give the networks at ``rows`` their own copies of their tensors (they leave the stack)."""
        for row in rows:
            model = self.jobs[self.members[row]].model
            for name in self.params:
                p = model.get_parameter(name)
                p.data = p.data.clone()
            for name in self.buffers:
                owner, attr = _owner(model, name)
                owner._buffers[attr] = owner._buffers[attr].clone()

    def keep(self, rows: list[int]) -> _Stack:
        """The stack of the networks at ``rows`` only, carrying their optimizer states."""
        index = torch.tensor(rows, device=next(iter(self.params.values())).device)
        smaller = _Stack(self.jobs, [self.members[r] for r in rows])
        if not rows:
            return smaller
        smaller.momentum = {n: m.index_select(0, index) for n, m in self.momentum.items()}
        if self.extra is not None:
            for old, new in zip(self.extra.param_groups[0]["params"], smaller.extra.param_groups[0]["params"]):
                smaller.extra.state[new] = {
                    k: v.index_select(0, index) if torch.is_tensor(v) and v.dim() > 0 else v.clone() if torch.is_tensor(v) else v
                    for k, v in self.extra.state[old].items()
                }
        return smaller

    @torch.no_grad()
    def step(self, lr: torch.Tensor, momentum: float, weight_decay: float) -> None:
        """One ``torch.optim.SGD`` step (dampening 0, no Nesterov) at each row's ``lr``; the regularizer's optimizer
        steps its own parameters; gradients are cleared."""
        for name in self.weights:
            p = self.params[name]
            grad = p.grad if weight_decay == 0 else p.grad.add(p, alpha=weight_decay)
            if momentum:
                buf = self.momentum.get(name)
                if buf is None:
                    buf = self.momentum[name] = grad.clone()
                else:
                    buf.mul_(momentum).add_(grad)
                grad = buf
            p.addcmul_(lr.view(-1, *([1] * (p.dim() - 1))), grad, value=-1)
        if self.extra is not None:
            self.extra.step()
        for p in self.params.values():
            p.grad = None


def train_stacked(jobs: Sequence[StageJob]) -> list[StageReport | NonFiniteLossError]:
    """Train the jobs' networks in place as one stacked model; each job's report, or the error that stopped it.

    The jobs must share a :func:`stack_key` and be stackable (:func:`unstackable`); a network whose epoch loss is
    non-finite leaves the stack with a :class:`NonFiniteLossError` and the others go on.
    """
    keys = {stack_key(job) for job in jobs}
    blocked = [(job.name, reason) for job in jobs if (reason := unstackable(job)) is not None]
    if len(keys) != 1 or blocked:
        raise ValueError(f"these jobs cannot share a stack: {blocked or 'their stack keys differ'}")
    first = jobs[0]
    device, task, stage0 = first.accelerator.device, first.task, first.stage
    for job in jobs:
        job.model.to(device).train()
    size, batch = len(first.loader.dataset), first.loader.batch_size
    reports = [StageReport(stage=job.name, epochs=job.stage.epochs, steps=0, seconds=0.0, samples=0) for job in jobs]
    outcome: list[StageReport | NonFiniteLossError | None] = [None if job.stage.epochs > 0 else reports[i] for i, job in enumerate(jobs)]
    members = [i for i in range(len(jobs)) if outcome[i] is None]
    if not members:
        return outcome  # type: ignore[return-value]
    data = _Data(jobs, device)
    objective = _Objective(jobs[members[0]].model, task, jobs[members[0]].regularizer)
    step = vmap(lambda params, buffers, x, y: functional_call(objective, (params, buffers), (x, y)), randomness="error")
    stack = _Stack(jobs, members)
    shown = any(job.progress for job in jobs)
    longest = max(job.stage.epochs for job in jobs)
    batches = math.ceil(size / batch)
    bar = tqdm(desc=f"{first.name} (+{len(members) - 1} stacked)", unit="batch", leave=False, total=longest * batches,
               disable=None if shown else True)
    lines, every = shown and bar.disable, max(1, math.ceil(longest / 10))
    epoch = 0
    try:
        while stack.members:
            members = stack.members
            orders = torch.stack([jobs[i].loader.epoch_order() for i in members]).to(device)
            for i in members:
                _set_epoch(jobs[i].loader, epoch)
            factors = [(jobs[i].stage.lr, lr_factor(jobs[i].stage), jobs[i].regularizer) for i in members]
            rates: list[float] = []
            lambdas: list[float] = []
            params = {f"model.{n}": p for n, p in stack.params.items()}
            buffers = {f"model.{n}": b for n, b in stack.buffers.items()}
            totals = torch.zeros(len(members), device=device)
            start = time.perf_counter()
            for index, offset in enumerate(range(0, size, batch)):
                position = epoch + index / batches  # the learning rates and λ move step by step
                values = ([base * factor(position) for base, factor, _ in factors],
                          [regularizer.weight(position) if regularizer is not None else 0.0 for _, _, regularizer in factors])
                if values != (rates, lambdas):  # new tensors only when a rate or λ moved (each epoch, for step schedules)
                    rates, lambdas = values
                    lr, weight = torch.tensor(rates, device=device), torch.tensor(lambdas, device=device)
                inputs, targets = data.batch(members, orders[:, offset : offset + batch])
                losses, penalties = step(params, buffers, inputs, targets)
                total = losses + weight * penalties if first.regularizer is not None else losses
                total.sum().backward()
                stack.step(lr, stage0.momentum, stage0.weight_decay)
                totals += losses.detach() * targets.shape[1]
                bar.update()
            seconds = (time.perf_counter() - start) / len(members)  # each network's share of the epoch
            epoch_loss = (totals / size).tolist()
            leaving = []
            for row, i in enumerate(members):
                job, report = jobs[i], reports[i]
                if not math.isfinite(epoch_loss[row]):
                    outcome[i] = NonFiniteLossError(
                        f"stage {job.name!r}: the training loss became non-finite in epoch {epoch + 1}; "
                        "lower the learning rate or check the data")
                    leaving.append(row)
                    continue
                entry = {"epoch": epoch + 1, "loss": epoch_loss[row], "lr": rates[row], "samples_per_second": size / seconds}
                if job.regularizer is not None:
                    entry.update(job.regularizer.log(), **{"lambda": lambdas[row]})  # the λ of the epoch's last step
                report.history.append(entry)
                report.steps, report.samples, report.seconds = report.steps + batches, report.samples + size, report.seconds + seconds
                job.accelerator.log({f"{job.name}/{k}": v for k, v in entry.items() if k != "epoch"}, step=epoch + 1)
                if epoch + 1 == job.stage.epochs:
                    outcome[i] = report
                    leaving.append(row)
            epoch += 1
            if lines and (epoch % every == 0 or epoch == longest):
                print(f"{first.name} (+{len(members) - 1} stacked): epoch {epoch}/{longest}, mean loss "
                      f"{sum(epoch_loss) / len(epoch_loss):.4g}", file=sys.stderr, flush=True)
            if leaving:
                stack.release(leaving)
                stack = stack.keep([r for r in range(len(members)) if r not in leaving])
    finally:
        stack.release(list(range(len(stack.members))))
        bar.close()
    return outcome  # type: ignore[return-value]


@dataclass
class _Request:
    jobs: Sequence[StageJob]
    caller: int  # the item index of the call that asked (stacks are filled in item order, whatever the threads' timing)
    done: threading.Event = field(default_factory=threading.Event)
    reports: list[StageReport] | None = None
    error: BaseException | None = None


class StackingTrainer:
    """A :data:`~hf_netmerge.training.runner.Trainer` that trains concurrent callers' jobs as stacks.

    :meth:`map` runs a function over items, each call in its own thread, one at a time (a baton: the code between
    trainings, global-RNG seeding and model creation included, runs as it would alone). A call that asks this
    trainer for training waits; once every running call waits or is done, the waiting jobs are grouped by
    :func:`stack_key` and each group trained by :func:`train_stacked` (jobs that cannot stack by ``train_stage``,
    alone), in :meth:`map`'s thread; then the calls go on. Outside :meth:`map`, the jobs of one call are stacked.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._baton = threading.Lock()
        self._queue: list[_Request] = []
        self._running = 0
        self._waiting = 0
        self._inside = threading.local()

    def __call__(self, jobs: Sequence[StageJob]) -> list[StageReport]:
        caller = getattr(self._inside, "index", None)
        request = _Request(jobs, caller if caller is not None else 0)
        if caller is None:
            self._serve([request])
            return self._result(request)
        with self._cond:
            self._queue.append(request)
            self._waiting += 1
            self._cond.notify_all()
        self._baton.release()
        request.done.wait()
        self._baton.acquire()
        return self._result(request)

    @staticmethod
    def _result(request: _Request) -> list[StageReport]:
        if request.error is not None:
            raise request.error
        return request.reports  # type: ignore[return-value]

    def map(self, function: Callable[[T], U], items: Sequence[T]) -> list[U]:
        """``[function(item) for item in items]``, with the trainings the calls ask for stacked; the first error (in
        item order) is raised once every call has ended."""
        results: list[Any] = [None] * len(items)
        errors: list[BaseException | None] = [None] * len(items)

        def call(k: int) -> None:
            self._inside.index = k
            with self._baton:
                try:
                    results[k] = function(items[k])
                except BaseException as e:  # re-raised in map's thread
                    errors[k] = e
            with self._cond:
                self._running -= 1
                self._cond.notify_all()

        self._running = len(items)
        threads = [threading.Thread(target=call, args=(k,), name=f"stacked-{k}", daemon=True) for k in range(len(items))]
        for thread in threads:
            thread.start()
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._running == 0 or (self._queue and self._waiting == self._running))
                if self._running == 0:
                    break
                batch, self._queue = sorted(self._queue, key=lambda r: r.caller), []
                self._waiting -= len(batch)
            self._serve(batch)
        for thread in threads:
            thread.join()
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first
        return results

    @staticmethod
    def _serve(requests: list[_Request]) -> None:
        """Train every request's jobs (stacked where they can be) and wake the requests."""
        jobs = [(r, k, job) for r in requests for k, job in enumerate(r.jobs)]
        for r in requests:
            r.reports = [None] * len(r.jobs)  # type: ignore[list-item]
        groups: dict[Hashable, list[tuple[_Request, int, StageJob]]] = defaultdict(list)
        try:
            for entry in jobs:
                job = entry[2]
                if unstackable(job) is not None:
                    try:
                        entry[0].reports[entry[1]] = job.run()  # type: ignore[index]
                    except Exception as e:
                        entry[0].error = entry[0].error or e
                else:
                    groups[stack_key(job)].append(entry)
            for group in groups.values():
                for (r, k, _), result in zip(group, train_stacked([job for _, _, job in group])):
                    if isinstance(result, BaseException):
                        r.error = r.error or result
                    else:
                        r.reports[k] = result  # type: ignore[index]
        except BaseException as e:  # reaches every waiting call, which raises it
            for r in requests:
                r.error = r.error or e
        finally:
            for r in requests:
                r.done.set()
