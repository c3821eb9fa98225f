"""Loading teachers (module, local timm directory, Hub id) and saving students in timm's layout.

Only ``config.json`` and ``model.safetensors`` are ever read: pickle checkpoints are refused.
Saving writes into a temporary directory beside the target and renames it into place, so a
reader finds either nothing or a complete student.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import importlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import timm
import torch
import yaml
from torch import nn

from .adapters import architecture_name, input_channels
from .data import Preprocessing
from .data.augment import channel_stats_notice_silenced
from .errors import (
    CheckpointError,
    CheckpointMismatchError,
    CorruptHeaderError,
    EmptyFileError,
    FormatMismatchError,
    HubPushError,
    HubUnreachableError,
    NotAStudentError,
    OfflineNotCachedError,
    OverlappingTensorsError,
    OversizedHeaderError,
    PickleRefusedError,
    RemoteFileNotFoundError,
    RepoNotFoundError,
    RevisionNotFoundError,
    TruncatedFileError,
    UnreachableReferenceError,
)
from .files import temp_dir
from .validation import check_output_dir

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
MERGE_CONFIG_NAME = "netmerge_config.json"
CARD_NAME = "README.md"
HUB_PROBE_SECONDS = 10  # one request asking the Hub whether a repo exists
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # <fcntl.h>, <linux/fs.h>
_SAFETENSORS_HEADER_LIMIT = 100 * 1024 * 1024


@dataclass(frozen=True)
class TeacherInfo:
    """Where a teacher came from: ``source`` is ``module``, ``local-dir`` or ``hf-hub``; ``license``: what the model card
    beside its weights (``README.md``) declares, if any; ``hub_origin``: the Hub repo a local directory's config
    names (``pretrained_cfg.hf_hub_id``; timm's own saves leave it out, so it is there only when put there)."""

    source: str
    architecture: str
    reference: str | None = None
    revision: str | None = None
    sha256: str | None = None
    license: str | None = None
    hub_origin: str | None = None

    @property
    def hub_id(self) -> str | None:
        """The Hub repository the weights come from: a Hub teacher's id, or a local teacher's recorded origin."""
        return self.reference if self.source == "hf-hub" else self.hub_origin

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def sniff_format(path: Path) -> str:
    """``safetensors``, ``pickle`` (a ``torch.save`` zip or a raw pickle) or ``unknown``, from the file's structure.

    safetensors is decided first and by structure (an 8-byte header length that fits in the file, then a JSON
    object), because its first byte is the length's low byte and may be anything, 0x80 (a pickle's opcode) included.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(9)
    if not head:
        raise EmptyFileError(f"{path} is empty; re-download or re-save the checkpoint")
    if len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "pickle"
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    return "unknown"


def check_safetensors(path: Path) -> None:
    """Validate a safetensors file's header before reading any tensor: size, JSON, dtypes, shapes, offsets."""
    size = path.stat().st_size
    if size == 0:
        raise EmptyFileError(f"{path} is empty; re-download or re-save the checkpoint")
    if size < 8:
        raise TruncatedFileError(f"{path} is truncated ({size} bytes); re-download it")
    with path.open("rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if length > _SAFETENSORS_HEADER_LIMIT:
            raise OversizedHeaderError(f"{path}: header claims {length} bytes (limit {_SAFETENSORS_HEADER_LIMIT}); the file is corrupt")
        if 8 + length > size:
            raise TruncatedFileError(f"{path}: header claims {length} bytes but the file has {size}; re-download it")
        raw = f.read(length)
    try:
        header = json.loads(raw)
        entries = [(name, e) for name, e in header.items() if name != "__metadata__"]
        spans = []
        for name, entry in entries:
            start, end = (int(v) for v in entry["data_offsets"])
            numel = 1
            for dim in entry["shape"]:
                numel *= int(dim)
            if entry["dtype"] not in _DTYPE_BYTES or start > end or end - start != numel * _DTYPE_BYTES[entry["dtype"]]:
                raise CorruptHeaderError(f"{path}: tensor {name!r} has inconsistent dtype, shape and offsets; the file is corrupt")
            spans.append((start, end, name))
    except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError) as e:
        raise CorruptHeaderError(f"{path}: the safetensors header is not valid ({type(e).__name__}); the file is corrupt") from e
    spans.sort()
    for (_, prev_end, prev), (start, _, name) in zip(spans, spans[1:]):
        if start < prev_end:
            raise OverlappingTensorsError(f"{path}: tensors {prev!r} and {name!r} overlap; the file is corrupt or crafted")
    if spans and spans[-1][1] > size - 8 - length:
        raise TruncatedFileError(f"{path}: tensor data ends past the end of the file; re-download it")


def read_weights(path: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """A state dict from ``path``, its format decided by its first bytes.

    safetensors is validated header first; a pickle is refused unless ``allow_pickle``, and then read
    with ``torch.load(weights_only=True)`` passed explicitly, with no fallback.
    """
    kind = sniff_format(path)
    if kind == "safetensors":
        if path.suffix in _PICKLE_SUFFIXES:
            raise FormatMismatchError(f"{path} is named like a pickle but holds safetensors; rename it to .safetensors")
        check_safetensors(path)
        try:
            return safetensors.torch.load_file(str(path), device="cpu")
        except safetensors.SafetensorError as e:
            raise CorruptHeaderError(f"{path}: {e}") from e
    if kind == "pickle":
        if path.suffix == ".safetensors":
            raise FormatMismatchError(f"{path} is named .safetensors but is a pickle; refusing it (pickles can run code)")
        if not allow_pickle:
            raise PickleRefusedError(
                f"{path} is a pickle checkpoint, which can run code; convert it to safetensors or pass allow_pickle=True"
            )
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure of the restricted unpickler is a refusal
            raise PickleRefusedError(f"{path}: refused by torch.load(weights_only=True): {type(e).__name__}: {e}") from e
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{path}: the pickle does not hold a flat state dict of tensors")
        return state
    raise CorruptHeaderError(f"{path}: not a safetensors or PyTorch checkpoint")


def _weights_in(directory: Path, allow_pickle: bool) -> Path:
    """The weights file of a timm directory: model.safetensors, else (when allowed) a pickle one."""
    if (directory / WEIGHTS_NAME).is_file():
        return directory / WEIGHTS_NAME
    pickles = [directory / n for n in ("pytorch_model.bin", "pytorch_model.pth", "model.pth") if (directory / n).is_file()]
    if pickles and not allow_pickle:
        raise PickleRefusedError(
            f"{directory} holds only {pickles[0].name}, a pickle; convert it to safetensors or pass allow_pickle=True"
        )
    if pickles:
        return pickles[0]
    raise CheckpointError(f"{directory}: no {WEIGHTS_NAME}; expected timm's layout ({CONFIG_NAME} + {WEIGHTS_NAME})")


def _load_dir(
    directory: Path, source: str, reference: str, revision: str | None, allow_pickle: bool = False
) -> tuple[nn.Module, TeacherInfo]:
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(f"{reference}: no {CONFIG_NAME} (expected timm's layout: {CONFIG_NAME} + {WEIGHTS_NAME})")
    weights_path = _weights_in(directory, allow_pickle)
    state = read_weights(weights_path, allow_pickle)
    try:
        model = timm.create_model(f"local-dir:{directory}", pretrained=False)
    except (RuntimeError, ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{reference}: cannot build the model from {CONFIG_NAME}: {e}") from e
    _load_state(model, state, reference)
    origin = json.loads(config_path.read_text()).get("pretrained_cfg", {}).get("hf_hub_id") if source == "local-dir" else None
    info = TeacherInfo(source, architecture_name(model), reference, revision, _sha256(weights_path), _card_license(directory),
                       origin if isinstance(origin, str) and origin else None)
    return model, info


def _card_license(directory: Path) -> str | None:
    """The license that the model card in ``directory`` declares in its metadata (None without a readable card)."""
    from huggingface_hub import ModelCard

    path = directory / CARD_NAME
    if not path.is_file():
        return None
    try:
        license_id = ModelCard.load(path).data.license
    except (ValueError, yaml.YAMLError):
        return None
    return license_id if isinstance(license_id, str) else None


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], reference: str) -> None:
    """Strictly load ``state``; a checkpoint that does not fit its own architecture is a :class:`CheckpointMismatchError`."""
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"{reference}: missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]} for {architecture_name(model)}"
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointMismatchError(
                f"{reference}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                f"{architecture_name(model)} expects {tuple(expected[name].shape)}"
            )
        if tensor.dtype != expected[name].dtype:
            raise CheckpointMismatchError(f"{reference}: tensor {name!r} is {tensor.dtype}, expected {expected[name].dtype}")
    model.load_state_dict(state, strict=True)


def load_teacher(
    ref: nn.Module | str | os.PathLike[str],
    architecture: str | None = None,
    model_args: dict[str, Any] | None = None,
    allow_pickle: bool = False,
) -> tuple[nn.Module, TeacherInfo]:
    """A teacher and its provenance.

    ``ref`` is an ``nn.Module``, a local timm directory (``config.json`` + ``model.safetensors``), a
    ``.safetensors`` file (then ``architecture`` and optional ``model_args`` say what to build), or a
    Hub id, optionally ``id@revision``; a Hub revision is resolved to its commit hash. Pickle
    checkpoints are refused unless ``allow_pickle`` (local files only; the Hub is read as safetensors).
    """
    if isinstance(ref, nn.Module):
        return ref, TeacherInfo("module", architecture_name(ref))
    if not isinstance(ref, (str, os.PathLike)):
        raise CheckpointError(f"unsupported teacher reference of type {type(ref).__name__}")
    path = Path(ref)
    if path.is_dir():
        return _load_dir(path, "local-dir", str(path), None, allow_pickle)
    if path.is_file():
        return _load_file(path, architecture, model_args, allow_pickle)
    if str(ref).startswith((".", "/", "~")) or str(ref).endswith(".safetensors"):
        raise CheckpointError(f"{ref}: no such file or directory")
    return _load_hub(str(ref))


def _load_file(
    path: Path, architecture: str | None, model_args: dict[str, Any] | None, allow_pickle: bool
) -> tuple[nn.Module, TeacherInfo]:
    if architecture is None:
        raise CheckpointError(f"{path}: a weights file needs architecture=... (a timm model name) to be built")
    if not timm.is_model(architecture):
        raise CheckpointError(f"{path}: unknown timm architecture {architecture!r}")
    state = read_weights(path, allow_pickle)
    model = timm.create_model(architecture, pretrained=False, **(model_args or {}))
    _load_state(model, state, str(path))
    return model, TeacherInfo("file", architecture, str(path), None, _sha256(path))


def _load_hub(ref: str) -> tuple[nn.Module, TeacherInfo]:
    """Fetch ``config.json`` then ``model.safetensors`` at the commit the revision resolved to.

    ``ref`` named no local path, so it is a Hub id: the Hub is asked once (no retries) whether the repo and revision
    exist; when it cannot be reached, the local Hub cache is used, and when that lacks it too the error says the name
    is neither a local path nor a reachable Hub repo (instead of a minute of download retries).
    """
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub import constants as hub_constants
    from huggingface_hub import errors as hub_errors

    repo_id, _, revision = ref.partition("@")
    typed = (  # most specific first: LocalEntryNotFoundError is an EntryNotFoundError
        (hub_errors.LocalEntryNotFoundError, OfflineNotCachedError, "go online once or unset HF_HUB_OFFLINE"),
        (hub_errors.OfflineModeIsEnabled, OfflineNotCachedError, "go online once or unset HF_HUB_OFFLINE"),
        (hub_errors.RepositoryNotFoundError, RepoNotFoundError,
         "no local path has that name either; check the path, or the id and that your token can see it"),
        (hub_errors.RevisionNotFoundError, RevisionNotFoundError, "check the branch, tag or commit"),
        (hub_errors.EntryNotFoundError, RemoteFileNotFoundError, f"the repo needs {CONFIG_NAME} and {WEIGHTS_NAME}"),
        (hub_errors.RemoteEntryNotFoundError, RemoteFileNotFoundError, f"the repo needs {CONFIG_NAME} and {WEIGHTS_NAME}"),
    )
    cache_only = bool(hub_constants.HF_HUB_OFFLINE)
    try:
        if not cache_only:
            try:
                HfApi().model_info(repo_id, revision=revision or None, timeout=HUB_PROBE_SECONDS)
            except hub_errors.HfHubHTTPError:
                raise
            except Exception as e:  # noqa: BLE001 (no connection, DNS, TLS or timeout: the HTTP library's own error types)
                cache_only, unreachable = True, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        try:
            config_path = Path(hf_hub_download(repo_id, CONFIG_NAME, revision=revision or None, local_files_only=cache_only))
        except hub_errors.LocalEntryNotFoundError as e:
            if hub_constants.HF_HUB_OFFLINE:
                raise
            raise UnreachableReferenceError(
                f"teacher {ref!r} is neither a local path (nothing of that name under {Path.cwd()}) nor a Hub repo that can "
                f"be reached now ({unreachable}) or that is cached; check the path, or go online once"
            ) from e
        commit = config_path.parent.name
        hf_hub_download(repo_id, WEIGHTS_NAME, revision=commit, local_files_only=cache_only)
        with contextlib.suppress(hub_errors.EntryNotFoundError, hub_errors.RemoteEntryNotFoundError, hub_errors.LocalEntryNotFoundError):
            hf_hub_download(repo_id, CARD_NAME, revision=commit, local_files_only=cache_only)  # for its license, when it has one
    except UnreachableReferenceError:
        raise
    except _transport_errors() as e:
        raise UnreachableReferenceError(
            f"teacher {ref!r}: the connection to the Hub at {hub_constants.ENDPOINT} failed while fetching it "
            f"({_first_line(e)}); nothing was loaded: check the network or proxy and run again"
        ) from e
    except (hub_errors.HfHubHTTPError, hub_errors.EntryNotFoundError, hub_errors.LocalEntryNotFoundError,
            hub_errors.OfflineModeIsEnabled, OSError, ValueError) as e:
        for source, error, advice in typed:
            if isinstance(e, source):
                raise error(f"teacher {ref!r}: {type(e).__name__}; {advice}") from e
        raise CheckpointError(f"cannot fetch teacher {ref!r} from the Hub: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    return _load_dir(config_path.parent, "hf-hub", repo_id, commit)


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The failures of the Hub client's HTTP transport (connect, timeout, TLS, proxy, a dropped connection) that
    huggingface_hub lets through: ``OSError``'s connection and timeout errors and its HTTP library's
    ``TransportError`` (httpx, or httpx2 in newer releases)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for name in ("httpx", "httpx2"):
        with contextlib.suppress(ImportError):
            errors.append(importlib.import_module(name).TransportError)
    return tuple(errors)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


# pretrained_cfg keys that describe the weights timm ships for an architecture, not a network saved from it
_INHERITED_WEIGHTS_KEYS = ("tag", "license", "origin_url", "paper_ids", "paper_name", "notes", "description", "hf_hub_id",
                           "hf_hub_filename", "url", "file", "source", "test_input_size", "test_crop_pct")


def _timm_layout(model: nn.Module, folder: Path, label_names: list[str] | None, preprocessing: Preprocessing | None,
                 license: str | None) -> None:
    """``config.json`` and ``model.safetensors`` of ``model`` in ``folder``, through timm's public ``save_for_hf``; the
    config then keeps ``num_classes`` out of ``model_args``, records in ``pretrained_cfg`` the ``preprocessing`` its
    inputs went through (so ``timm.data.resolve_data_config({}, model=reloaded)`` gives it) and this network's
    ``license`` (none when None), and drops what ``pretrained_cfg`` inherits about timm's own pretrained weights
    (their tag, license, origin, papers, test size); the weights are rewritten as contiguous tensors with
    safetensors' ``format: pt`` metadata; both files are fsynced.

    (transformers' timm wrapper passes ``num_classes`` itself and fails when ``model_args`` repeats it.)
    """
    from timm.models import save_for_hf

    with channel_stats_notice_silenced():
        save_for_hf(model, folder, model_config={"label_names": label_names} if label_names else None, safe_serialization=True)
    config = json.loads((folder / CONFIG_NAME).read_text())
    config["model_args"] = {**input_args(model), **config.get("model_args", {})}  # timm's own values win
    config["model_args"].pop("num_classes", None)
    if not config.get("model_args"):
        config.pop("model_args", None)
    pretrained = {k: v for k, v in config.get("pretrained_cfg", {}).items() if k not in _INHERITED_WEIGHTS_KEYS}
    config["pretrained_cfg"] = {**pretrained, **(preprocessing.to_dict() if preprocessing is not None else {}),
                                **({"license": license} if license else {})}
    _write(folder / CONFIG_NAME, json.dumps(config, indent=2))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _write(folder / WEIGHTS_NAME, safetensors.torch.save(state, metadata={"format": "pt"}))


def input_args(model: nn.Module) -> dict[str, Any]:
    """The input channels and fixed image size ``model`` was built with, as ``create_model`` arguments. timm writes
    them into ``model_args`` itself only from 1.0.31 on; before, a 1-channel model's config rebuilt a 3-channel one."""
    args: dict[str, Any] = {}
    in_chans = input_channels(model)
    if in_chans != 3:
        args["in_chans"] = in_chans
    img_size = getattr(model, "img_size", None)
    if isinstance(img_size, (int, tuple, list)):
        args["img_size"] = list(img_size) if isinstance(img_size, (tuple, list)) else img_size
    return args


def _write(path: Path, data: bytes | str) -> None:
    with path.open("wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())


def save_network(
    model: nn.Module,
    directory: str | os.PathLike[str],
    *,
    extra_files: dict[str, str] | None = None,
    label_names: list[str] | None = None,
    preprocessing: Preprocessing | None = None,
    license: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` in timm's layout (``config.json``, ``model.safetensors``) plus ``extra_files`` (name → text),
    atomically: a complete temporary directory renamed into place, or exchanged with the existing one in a single
    rename where the system can (Linux), so a killed save leaves the old directory or the new one, never a mix."""
    target = check_output_dir(directory, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.*-*"):  # left by a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = temp_dir(target.parent, f".{target.name}.tmp-")
    try:
        _timm_layout(model, tmp, label_names, preprocessing, license)
        for name, text in (extra_files or {}).items():
            _write(tmp / name, text)
        if not target.exists():
            os.replace(tmp, target)
        elif _exchange(tmp, target):
            shutil.rmtree(tmp)  # now the old student
        else:  # two renames: a crash between them leaves the old student in .NAME.old-*/NAME and the new in .NAME.tmp-*
            old = temp_dir(target.parent, f".{target.name}.old-")
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic rename (Linux ``renameat2(RENAME_EXCHANGE)``); False where the platform or
    file system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(b))


def save_student(
    student: nn.Module,
    directory: str | os.PathLike[str],
    *,
    merge_record: dict[str, Any],
    card: str,
    label_names: list[str] | None = None,
    preprocessing: Preprocessing | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``config.json``, ``model.safetensors``, ``netmerge_config.json`` and ``README.md`` atomically."""
    extra = {MERGE_CONFIG_NAME: json.dumps(merge_record, indent=2), CARD_NAME: card}  # in record order: the card renders from it
    return save_network(student, directory, extra_files=extra, label_names=label_names, preprocessing=preprocessing,
                        license=merge_record.get("license"), overwrite=overwrite)


STUDENT_FILES = (CONFIG_NAME, WEIGHTS_NAME, MERGE_CONFIG_NAME, CARD_NAME)


def check_student_dir(folder: str | os.PathLike[str]) -> Path:
    """``folder`` as a Path if it holds a saved student's files, else :class:`NotAStudentError` naming what is missing."""
    path = Path(folder)
    missing = [name for name in STUDENT_FILES if not (path / name).is_file()]
    if missing:
        raise NotAStudentError(f"{path} is not a saved student: it lacks {', '.join(missing)} (save one with merge --output-dir)")
    return path


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

    Files identical to the branch's are not sent again; when none changed, no commit is made and the URL of
    the branch's head commit is returned. The token comes from ``token``, ``HF_TOKEN`` or the cached login; it
    is never logged. Returns the commit URL. A refused request raises :class:`HubPushError` (repo, HTTP status,
    the folder that still holds everything).
    """
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token, library_name="hf_netmerge")
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        operations = [CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p)) for p in sorted(folder.iterdir())]
        return api.create_commit(repo_id, operations, commit_message=commit_message, revision=revision).commit_url
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "no response"
        raise HubPushError(
            f"publishing {folder} to the Hub repo {repo_id!r} failed (HTTP {status}): {str(e).splitlines()[0]}; nothing was "
            f"committed and {folder} is intact: publish it later with `hf-netmerge push {folder} {repo_id}`"
        ) from e
    except _transport_errors() as e:
        raise HubUnreachableError(
            f"cannot reach the Hub at {api.endpoint} to publish {folder} to {repo_id!r} ({_first_line(e)}); nothing was "
            f"committed and {folder} is intact: publish it later with `hf-netmerge push {folder} {repo_id}`"
        ) from e
