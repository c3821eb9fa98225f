"""Loading teachers (module, local timm directory, Hub id) and saving students in timm's layout.

Only ``config.json`` and ``model.safetensors`` are ever read: pickle checkpoints are refused.
Saving writes into a temporary directory beside the target and renames it into place, so a
reader finds either nothing or a complete student.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import timm
from torch import nn

from .adapters import architecture_name
from .errors import CheckpointError
from .validation import check_output_dir

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
MERGE_CONFIG_NAME = "netmerge_config.json"
CARD_NAME = "README.md"
_SAFETENSORS_HEADER_LIMIT = 100 * 1024 * 1024


@dataclass(frozen=True)
class TeacherInfo:
    """Where a teacher came from: ``source`` is ``module``, ``local-dir`` or ``hf-hub``."""

    source: str
    architecture: str
    reference: str | None = None
    revision: str | None = None
    sha256: str | None = None

    @property
    def hub_id(self) -> str | None:
        """The Hub repository id, for Hub teachers."""
        return self.reference if self.source == "hf-hub" else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_safetensors_header(path: Path) -> None:
    """Refuse a weights file that is not safetensors, judged by its first bytes (not its name)."""
    with path.open("rb") as f:
        head = f.read(9)
    if len(head) < 9:
        raise CheckpointError(f"{path} is empty or truncated")
    size = int.from_bytes(head[:8], "little")
    if head[8:9] != b"{" or size > _SAFETENSORS_HEADER_LIMIT or size + 8 > path.stat().st_size:
        raise CheckpointError(f"{path} is not a safetensors file (pickle and other formats are refused)")


def _load_dir(directory: Path, source: str, reference: str, revision: str | None) -> tuple[nn.Module, TeacherInfo]:
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not config_path.is_file():
        raise CheckpointError(f"{reference}: no {CONFIG_NAME} (expected timm's layout: {CONFIG_NAME} + {WEIGHTS_NAME})")
    if not weights_path.is_file():
        raise CheckpointError(f"{reference}: no {WEIGHTS_NAME}; only safetensors weights are loaded")
    _check_safetensors_header(weights_path)
    try:
        model = timm.create_model(f"local-dir:{directory}", pretrained=False)
    except (RuntimeError, ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{reference}: cannot build the model from {CONFIG_NAME}: {e}") from e
    try:
        state = safetensors.torch.load_file(str(weights_path), device="cpu")
        model.load_state_dict(state, strict=True)
    except (safetensors.SafetensorError, RuntimeError) as e:
        raise CheckpointError(f"{reference}: weights do not load into {architecture_name(model)}: {e}") from e
    info = TeacherInfo(source, architecture_name(model), reference, revision, _sha256(weights_path))
    return model, info


def load_teacher(
    ref: nn.Module | str | os.PathLike[str], architecture: str | None = None, model_args: dict[str, Any] | None = None
) -> tuple[nn.Module, TeacherInfo]:
    """A teacher and its provenance.

    ``ref`` is an ``nn.Module``, a local timm directory (``config.json`` + ``model.safetensors``), a
    ``.safetensors`` file (then ``architecture`` and optional ``model_args`` say what to build), or a
    Hub id, optionally ``id@revision``; a Hub revision is resolved to its commit hash.
    """
    if isinstance(ref, nn.Module):
        return ref, TeacherInfo("module", architecture_name(ref))
    if not isinstance(ref, (str, os.PathLike)):
        raise CheckpointError(f"unsupported teacher reference of type {type(ref).__name__}")
    path = Path(ref)
    if path.is_dir():
        return _load_dir(path, "local-dir", str(path), None)
    if path.is_file():
        return _load_file(path, architecture, model_args)
    if str(ref).startswith((".", "/", "~")) or str(ref).endswith(".safetensors"):
        raise CheckpointError(f"{ref}: no such file or directory")
    return _load_hub(str(ref))


def _load_file(path: Path, architecture: str | None, model_args: dict[str, Any] | None) -> tuple[nn.Module, TeacherInfo]:
    if architecture is None:
        raise CheckpointError(f"{path}: a weights file needs architecture=... (a timm model name) to be built")
    if not timm.is_model(architecture):
        raise CheckpointError(f"{path}: unknown timm architecture {architecture!r}")
    _check_safetensors_header(path)
    model = timm.create_model(architecture, pretrained=False, **(model_args or {}))
    try:
        model.load_state_dict(safetensors.torch.load_file(str(path), device="cpu"), strict=True)
    except (safetensors.SafetensorError, RuntimeError) as e:
        raise CheckpointError(f"{path}: weights do not load into {architecture}: {e}") from e
    return model, TeacherInfo("file", architecture, str(path), None, _sha256(path))


def _load_hub(ref: str) -> tuple[nn.Module, TeacherInfo]:
    """Fetch ``config.json`` then ``model.safetensors`` at the commit the revision resolved to (works offline from cache)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    repo_id, _, revision = ref.partition("@")
    try:
        config_path = Path(hf_hub_download(repo_id, CONFIG_NAME, revision=revision or None))
        commit = config_path.parent.name
        hf_hub_download(repo_id, WEIGHTS_NAME, revision=commit)
    except (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, OSError, ValueError) as e:
        raise CheckpointError(f"cannot fetch teacher {ref!r} from the Hub: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    return _load_dir(config_path.parent, "hf-hub", repo_id, commit)


def timm_config(model: nn.Module, label_names: list[str] | None = None) -> dict[str, Any]:
    """timm's ``config.json`` for ``model``, with ``num_classes`` kept out of ``model_args``.

    (transformers' timm wrapper passes ``num_classes`` itself and fails when ``model_args`` repeats it.)
    """
    from timm.models._hub import save_config_for_hf

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / CONFIG_NAME
        save_config_for_hf(model, str(path), model_config={"label_names": label_names} if label_names else None)
        config = json.loads(path.read_text())
    config.get("model_args", {}).pop("num_classes", None)
    if not config.get("model_args"):
        config.pop("model_args", None)
    return config


def _write(path: Path, data: bytes | str) -> None:
    with path.open("wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())


def save_student(
    student: nn.Module,
    directory: str | os.PathLike[str],
    *,
    merge_record: dict[str, Any],
    card: str,
    label_names: list[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``config.json``, ``model.safetensors``, ``netmerge_config.json`` and ``README.md`` atomically."""
    target = check_output_dir(directory, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        _write(tmp / CONFIG_NAME, json.dumps(timm_config(student, label_names), indent=2))
        state = {k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()}
        _write(tmp / WEIGHTS_NAME, safetensors.torch.save(state, metadata={"format": "pt"}))
        _write(tmp / MERGE_CONFIG_NAME, json.dumps(merge_record, indent=2, sort_keys=True))
        _write(tmp / CARD_NAME, card)
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def push_folder(
    folder: Path,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Add merged student (hf_netmerge)",
    token: str | None = None,
) -> str:
    """Publish every file of ``folder`` to ``repo_id`` in one commit (the repo and branch are created if needed).

    The token comes from ``token``, ``HF_TOKEN`` or the cached login; it is never logged. Returns the commit URL.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token, library_name="hf_netmerge")
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p)) for p in sorted(folder.iterdir())]
    info = api.create_commit(repo_id, operations, commit_message=commit_message, revision=revision)
    return info.commit_url
