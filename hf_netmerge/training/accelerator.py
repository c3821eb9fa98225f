"""The Accelerator every stage runs under, when Accelerate must own the optimizer step, and work done once per run."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DataLoaderConfiguration, DistributedType, broadcast_object_list

from ..errors import ConfigError


def make_accelerator(
    mixed_precision: str = "no",
    cpu: bool | None = None,
    gradient_accumulation_steps: int = 1,
    log_with: list[str] | None = None,
    project_dir: str | None = None,
) -> Accelerator:
    """An Accelerator for ``mixed_precision``, on CPU when no GPU is present.

    Batches are split across processes (``batch_size`` is the global batch), so one and several
    processes see the same data per optimizer step. Accelerate fixes the precision once per process;
    asking for another one later, or fp16 on a CPU, is refused with :class:`ConfigError`.
    """
    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != mixed_precision:
        raise ConfigError(
            f"this process already runs Accelerate with mixed_precision={AcceleratorState().mixed_precision!r}; "
            f"use the same value or a new process for {mixed_precision!r}"
        )
    if cpu is None:
        cpu = not torch.cuda.is_available()
    if cpu and mixed_precision == "fp16":
        raise ConfigError("mixed_precision='fp16' needs a GPU; use 'bf16' on a CPU")
    return Accelerator(
        mixed_precision=mixed_precision,
        cpu=cpu,
        gradient_accumulation_steps=gradient_accumulation_steps,
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        log_with=log_with or None,
        project_dir=project_dir,
    )


def optimizer_needs_accelerate(accelerator: Accelerator) -> bool:
    """Whether Accelerate must wrap the optimizers: fp16 loss scaling or an engine that owns the step.

    Plain, DDP and bf16 runs step the torch optimizers directly (DDP syncs gradients in backward);
    Accelerate's wrapper would add an import probe to every step, ~40% of a small model's step on CPU.
    """
    plain = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
    return accelerator.scaler is not None or accelerator.distributed_type not in plain


T = TypeVar("T")


def on_main_process(work: Callable[[], T]) -> T:
    """``work()`` on the main process only (a Hub push, a printed table); every process returns its result or raises
    its error, so under ``accelerate launch`` a side effect happens once and all processes agree on the outcome."""
    state = PartialState()
    outcome: list = [None, None]
    if state.is_main_process:
        try:
            outcome[0] = work()
        except Exception as e:  # noqa: BLE001 (re-raised below, on every process)
            outcome[1] = e
    if state.num_processes > 1:
        broadcast_object_list(outcome, from_process=0)
    if outcome[1] is not None:
        raise outcome[1]
    return outcome[0]
