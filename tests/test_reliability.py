"""Every bad input refused up front with its own typed error, safe loading, atomic outputs, reproducibility."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hf_netmerge as hm
from hf_netmerge.cli import main
from hf_netmerge.config import StageConfig
from hf_netmerge.data import TensorBatchDataset, make_loader
from hf_netmerge.hub import load_teacher
from hf_netmerge.training import make_accelerator, train_stage
from hf_netmerge.training.checkpoint import StageCheckpoint

from conftest import QUIET, image_dataset, make_teacher

FAST = hm.MergeConfig(gate_epochs=1, finetune_epochs=1, batch_size=16)
LENET = {"num_classes": 4}
LOAD_LENET = hm.LoadOptions(architecture="netmerge_lenet", model_args=LENET)


@pytest.fixture(scope="module")
def data():
    return image_dataset(32, 4, seed=0)


def _teacher(seed: int = 0, **kwargs):
    return make_teacher("netmerge_lenet", {**LENET, **kwargs}, seed)


def _weights(tmp_path: Path, name: str = "w.safetensors", model=None) -> Path:
    path = tmp_path / name
    safetensors.torch.save_file((model or _teacher()).state_dict(), str(path))
    return path


def _edit_header(path: Path, edit) -> Path:
    raw = path.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + length])
    edit(header)
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + length :])
    return path


def _overlap(header):
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    first, second = header[names[0]], header[names[1]]
    start = first["data_offsets"][0]
    width = second["data_offsets"][1] - second["data_offsets"][0]
    second["data_offsets"] = [start, start + width]


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/netmerge-pwned",))


def _pickle_with_code(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    buffer = io.BytesIO()
    pickle.dump({"conv1.weight": Evil()}, buffer)
    path.write_bytes(buffer.getvalue())
    return path


FILE_CASES = {
    "empty file": (lambda p: (p / "w.safetensors").write_bytes(b"") or p / "w.safetensors", hm.EmptyFileError),
    "truncated file": (lambda p: _truncate(_weights(p)), hm.TruncatedFileError),
    "corrupt header": (lambda p: _corrupt(_weights(p)), hm.CorruptHeaderError),
    "overlapping offsets": (lambda p: _edit_header(_weights(p), _overlap), hm.OverlappingTensorsError),
    "oversized header": (lambda p: _oversize(_weights(p)), hm.OversizedHeaderError),
    "pickle carrying code": (lambda p: _pickle_with_code(p, "w.bin"), hm.PickleRefusedError),
    "extension lies": (lambda p: _pickle_with_code(p, "w.safetensors"), hm.FormatMismatchError),
    "missing keys": (lambda p: _drop_key(_teacher()), hm.CheckpointMismatchError),
}


def _truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[:-100])
    return path


def _corrupt(path: Path) -> Path:
    raw = bytearray(path.read_bytes())
    raw[9:20] = b"not json!!!"
    path.write_bytes(bytes(raw))
    return path


def _oversize(path: Path) -> Path:
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 1 << 40) + raw[8:])
    return path


_TMP: dict[str, Path] = {}


def _drop_key(model) -> Path:
    state = dict(model.state_dict())
    state.pop("fc2.bias")
    path = _TMP["dir"] / "w.safetensors"
    safetensors.torch.save_file(state, str(path))
    return path


class StepCounter:
    """Counts optimizer steps so a test can show that none ran."""

    def __init__(self, monkeypatch):
        self.steps = 0
        for cls in (torch.optim.SGD, torch.optim.Adam):
            original = cls.step

            def counted(opt, *args, _original=original, **kwargs):
                self.steps += 1
                return _original(opt, *args, **kwargs)

            monkeypatch.setattr(cls, "step", counted)


def _snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("case", list(FILE_CASES), ids=list(FILE_CASES))
def test_bad_checkpoint_files_are_refused_with_their_own_error(case, tmp_path, data, monkeypatch):
    _TMP["dir"] = tmp_path
    make, error = FILE_CASES[case]
    path = make(tmp_path)
    counter = StepCounter(monkeypatch)
    before = _snapshot(tmp_path)
    with pytest.raises(error):
        hm.merge_models(path, _teacher(1), data, config=FAST, output=tmp_path / "out", load=LOAD_LENET, run=QUIET)
    assert counter.steps == 0 and _snapshot(tmp_path) == before
    assert not Path("/tmp/netmerge-pwned").exists()


def test_a_safetensors_file_is_told_by_its_structure_whatever_its_first_byte(tmp_path):
    """The first byte of a safetensors file is its header length's low byte: 0x80 (a pickle's opcode) among them."""
    model = _teacher()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    offsets, blobs, entries = 0, [], {}
    for name, tensor in state.items():
        raw = tensor.numpy().tobytes()
        entries[name] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [offsets, offsets + len(raw)]}
        offsets += len(raw)
        blobs.append(raw)
    header = json.dumps(entries).encode()
    base = (len(header) // 256 + 1) * 256
    for low in range(256):
        path = tmp_path / f"{low}" / "model.safetensors"
        path.parent.mkdir()
        padded = header + b" " * (base + low - len(header))
        path.write_bytes(struct.pack("<Q", len(padded)) + padded + b"".join(blobs))
        assert path.read_bytes()[0] == low
        loaded, _ = load_teacher(path, "netmerge_lenet", LENET)
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())


def test_pickle_with_code_is_refused_even_when_pickles_are_allowed(tmp_path):
    path = _pickle_with_code(tmp_path, "w.bin")
    with pytest.raises(hm.PickleRefusedError, match="weights_only"):
        load_teacher(path, "netmerge_lenet", LENET, allow_pickle=True)
    assert not Path("/tmp/netmerge-pwned").exists()


def test_a_plain_pickle_state_dict_loads_only_when_allowed(tmp_path):
    model = _teacher()
    path = tmp_path / "w.pth"
    torch.save(model.state_dict(), path)
    with pytest.raises(hm.PickleRefusedError, match="allow_pickle=True"):
        load_teacher(path, "netmerge_lenet", LENET)
    loaded, info = load_teacher(path, "netmerge_lenet", LENET, allow_pickle=True)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def _nan(model):
    with torch.no_grad():
        model.fc1.weight[0, 0] = float("inf")
    return model


def _pair(make_b=lambda: _teacher(1)):
    return lambda: (_teacher(0), make_b())


def _unmergeable(name: str, **kwargs):
    return lambda: (timm.create_model(name, num_classes=4, **kwargs), timm.create_model(name, num_classes=4, **kwargs))


# The one table of refused inputs to merge_models: (teachers, data, error). Checkpoint files: FILE_CASES above.
REFUSALS = {
    "different architecture": (_pair(lambda: make_teacher("netmerge_lenet_bn", LENET, 1)), None, hm.ArchitectureMismatchError),
    "different num_classes": (_pair(lambda: _teacher(1, num_classes=5)), None, hm.NumClassesMismatchError),
    "shape mismatch": (_pair(lambda: _teacher(1, hidden_sizes=(100, 80))), None, hm.ShapeMismatchError),
    "dtype mismatch": (_pair(lambda: _teacher(1).double()), None, hm.DtypeMismatchError),
    "non-finite weights": (_pair(lambda: _nan(_teacher(1))), None, hm.NonFiniteWeightsError),
    "unsupported op (stacked paths)": (_unmergeable("skresnet18"), None, hm.UnsupportedModelError),
    "unsupported model (ViT with q/k norms)": (_unmergeable("test_vit", qk_norm=True), None, hm.UnsupportedModelError),
    "empty dataset": (_pair(), lambda: image_dataset(32, 4).select([]), hm.EmptyDatasetError),
    "smaller than one batch": (_pair(), lambda: image_dataset(8, 4), hm.DatasetTooSmallError),
    "labels out of range": (_pair(), lambda: image_dataset(32, 6), hm.LabelRangeError),
    "negative labels": (_pair(), lambda: TensorBatchDataset(torch.randn(32, 3, 28, 28), torch.full((32,), -1)), hm.LabelRangeError),
    "missing label column": (_pair(), lambda: image_dataset(32, 4).rename_column("label", "y"), hm.MissingColumnError),
    "missing image column": (_pair(), lambda: image_dataset(32, 4).rename_column("image", "img"), hm.MissingColumnError),
    "tabular data for image teachers": (_pair(), lambda: TensorBatchDataset(torch.randn(32, 5), torch.randint(0, 4, (32,))),
                                        hm.DataModelMismatchError),
}


@pytest.mark.parametrize("case", list(REFUSALS), ids=list(REFUSALS))
def test_bad_teachers_and_data_are_refused_with_their_own_error(case, tmp_path, data, monkeypatch):
    make_teachers, make_data, error = REFUSALS[case]
    a, b = make_teachers()
    counter = StepCounter(monkeypatch)
    with pytest.raises(error):
        hm.merge_models(a, b, make_data() if make_data else data, config=FAST, output=tmp_path / "out", run=QUIET)
    assert counter.steps == 0 and list(tmp_path.iterdir()) == []


def test_existing_output_and_invalid_config_are_refused(tmp_path, data, monkeypatch, capsys):
    counter = StepCounter(monkeypatch)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    with pytest.raises(hm.OutputExistsError):
        hm.merge_models(_teacher(0), _teacher(1), data, config=FAST, output=tmp_path / "out", run=QUIET)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine.txt"]
    with pytest.raises(hm.ConfigError):
        hm.MergeConfig.from_dict({"gate_epochs": -1})
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\nteacher: {epochs: many}\n")
    assert main(["run", str(recipe), "--output-dir", str(tmp_path / "run")]) == 2
    assert "expected an integer" in capsys.readouterr().err
    assert counter.steps == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["out", "r.yaml"]


@pytest.mark.parametrize("ref,error", [("user/absent", hm.RepoNotFoundError), ("user/present@nope", hm.RevisionNotFoundError),
                                       ("user/config-only", hm.RemoteFileNotFoundError)])
def test_hub_references_fail_with_their_own_error(hub, tmp_path, ref, error):
    from hf_netmerge.hub import push_folder
    from timm.models._hub import save_for_hf

    if "user/present" not in hub.state.repos:
        save_for_hf(_teacher(), tmp_path / "present", safe_serialization=True)
        push_folder(tmp_path / "present", "user/present")
        (tmp_path / "cfg").mkdir()
        (tmp_path / "cfg" / "config.json").write_text('{"architecture": "netmerge_lenet", "num_classes": 4}')
        push_folder(tmp_path / "cfg", "user/config-only")
    with pytest.raises(error):
        load_teacher(ref)


def test_offline_and_not_cached_has_its_own_error(hub, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(hm.OfflineNotCachedError):
        load_teacher("user/never-fetched")


PERTURBATIONS = st.sampled_from(["drop", "rename", "reshape", "retype", "nan"])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=PERTURBATIONS, index=st.integers(min_value=0, max_value=100))
def test_perturbed_state_dicts_only_raise_typed_errors(tmp_path, data, kind, index):
    state = dict(_teacher().state_dict())
    key = sorted(state)[index % len(state)]
    if kind == "drop":
        state.pop(key)
    elif kind == "rename":
        state[key + "_renamed"] = state.pop(key)
    elif kind == "reshape":
        state[key] = state[key].reshape(-1)[: max(1, state[key].numel() - 1)].clone()
    elif kind == "retype":
        state[key] = state[key].to(torch.float64 if state[key].is_floating_point() else torch.int32)
    else:
        state[key] = state[key].float().clone().fill_(float("nan"))
    path = tmp_path / f"{kind}-{index}.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(hm.NetMergeError):
        hm.merge_models(path, _teacher(1), data, config=FAST, load=LOAD_LENET, run=QUIET, output=tmp_path / f"out-{kind}-{index}")
    assert not (tmp_path / f"out-{kind}-{index}").exists()


def test_same_seed_gives_identical_student_weights(data):
    def digest():
        result = hm.merge_models(_teacher(0), _teacher(1), data, data, FAST, run=QUIET)
        return hashlib.sha256(safetensors.torch.save(result.student.state_dict())).hexdigest()

    assert digest() == digest()


class BlowsUpAfter(TensorBatchDataset):
    """Serves infinite inputs from its ``after``-th example on (counted in the order served, across epochs; a loader may
    gather several batches in one call)."""

    def __init__(self, *tensors, after: int):
        super().__init__(*tensors)
        self.served, self.after = 0, after

    def __getitems__(self, indices):
        batch = super().__getitems__(indices)
        x = batch[0].clone()
        x[torch.arange(self.served, self.served + len(x)) >= self.after] = float("inf")
        self.served += len(x)
        return type(batch)((x, batch[1]))


def test_non_finite_loss_stops_with_stage_and_step_and_keeps_the_last_good_checkpoint(tmp_path):
    gen = torch.Generator().manual_seed(0)
    data = BlowsUpAfter(torch.randn(64, 1, 28, 28, generator=gen), torch.randint(0, 4, (64,), generator=gen), after=5 * 16)
    checkpoint = StageCheckpoint(tmp_path / "stage")
    model = timm.create_model("netmerge_lenet", num_classes=4, in_chans=1)
    with pytest.raises(hm.NonFiniteLossError, match=r"stage 'teacher'.*batch 2 of epoch 2"):
        train_stage(model, make_loader(data, 16, shuffle=True), StageConfig(epochs=3), task="classification",
                    accelerator=make_accelerator("no"), name="teacher", checkpoint=checkpoint, progress=False)
    assert checkpoint.latest().name == "epoch-00001"
    restored = timm.create_model("netmerge_lenet", num_classes=4, in_chans=1)
    restored.load_state_dict(checkpoint.load()["model"])
    assert all(torch.isfinite(p).all() for p in restored.parameters())


KILLED_SAVE = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import hf_netmerge.files as files
from hf_netmerge.formats import save_network
from conftest import make_teacher

point, seed = {point!r}, {seed}
writes = 0
write, exchange = files.write_file, files.exchange

def dying_write(path, data):
    global writes
    writes += 1
    if point == f"write {{writes}}":
        with open(path, "wb") as f:  # half the file, then the process dies inside the write
            f.write((data.encode() if isinstance(data, str) else data)[: max(1, len(data) // 2)])
        os.kill(os.getpid(), signal.SIGKILL)
    write(path, data)

def dying_exchange(a, b):
    if point == "before the swap":
        os.kill(os.getpid(), signal.SIGKILL)
    swapped = exchange(a, b)
    if point == "after the swap":
        os.kill(os.getpid(), signal.SIGKILL)
    return swapped

files.write_file, files.exchange = dying_write, dying_exchange
save_network(make_teacher("netmerge_lenet", {{"num_classes": 4}}, seed), {out!r}, extra_files={{"README.md": f"seed {{seed}}"}},
             overwrite=True)
"""
KILL_POINTS = ["write 1", "write 2", "write 3", "before the swap", "after the swap", "never"]


def _weights_sha(directory: Path) -> str:
    return hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()


@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_save_killed_inside_a_write_or_rename_leaves_the_old_student_or_the_new_one(tmp_path, point):
    from hf_netmerge.formats import save_network

    out = tmp_path / "student"
    tests = str(Path(__file__).parent)
    save_network(make_teacher("netmerge_lenet", LENET, 0), out, extra_files={"README.md": "seed 0"})
    old = _weights_sha(out)
    done = subprocess.run([sys.executable, "-c", KILLED_SAVE.format(tests=tests, point=point, seed=1, out=str(out))])
    assert done.returncode == (0 if point == "never" else -signal.SIGKILL)  # the kill happened where it was asked for
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    new_landed = point in ("after the swap", "never")
    assert (out / "README.md").read_text() == f"seed {int(new_landed)}" and (_weights_sha(out) == old) != new_landed
    timm.create_model(f"local-dir:{out}", pretrained=True)  # whichever it is, it loads
    if point.startswith("write"):  # a first save killed before its rename leaves nothing
        fresh = tmp_path / "fresh"
        subprocess.run([sys.executable, "-c", KILLED_SAVE.format(tests=tests, point=point, seed=1, out=str(fresh))])
        assert not fresh.exists()
