"""Fetching teachers (a module, a local directory or file, a Hub id) and publishing students to the Hub.

Only ``config.json``, ``model.safetensors`` and the format's own small files (an image processor's config) are
ever fetched: pickle checkpoints are refused. What the files mean is the formats' business
(:mod:`hf_netmerge.formats`).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from .errors import (
    CheckpointError,
    HubPushError,
    HubUnreachableError,
    OfflineNotCachedError,
    RemoteFileNotFoundError,
    RepoNotFoundError,
    RevisionNotFoundError,
    UnreachableReferenceError,
)
from .formats import (
    CARD_NAME,
    CONFIG_NAME,
    WEIGHTS_NAME,
    architecture_name,
    create_model,
    format_for_architecture,
    format_of_directory,
    load_directory,
    sha256,
)
from .formats.weights import load_state, read_weights

HUB_PROBE_SECONDS = 10  # one request asking the Hub whether a repo exists


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


def _load_dir(
    directory: Path, source: str, reference: str, revision: str | None, allow_pickle: bool = False
) -> tuple[nn.Module, TeacherInfo]:
    model, weights = load_directory(directory, reference, allow_pickle)
    origin = json.loads((directory / CONFIG_NAME).read_text()).get("pretrained_cfg", {}).get("hf_hub_id") if source == "local-dir" else None
    info = TeacherInfo(source, architecture_name(model), reference, revision, sha256(weights), _card_license(directory),
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


def load_teacher(
    ref: nn.Module | str | os.PathLike[str],
    architecture: str | None = None,
    model_args: dict[str, Any] | None = None,
    allow_pickle: bool = False,
) -> tuple[nn.Module, TeacherInfo]:
    """A teacher and its provenance.

    ``ref`` is an ``nn.Module``, a local directory in timm's or transformers' layout (``config.json`` +
    ``model.safetensors``), a ``.safetensors`` file (then ``architecture`` and optional ``model_args`` say what to
    build), or a Hub id, optionally ``id@revision``; a Hub revision is resolved to its commit hash. Pickle
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
        raise CheckpointError(f"{path}: a weights file needs architecture=... (a timm model name or transformers:<model_type>) to be built")
    if not format_for_architecture(architecture).handles(architecture):
        raise CheckpointError(f"{path}: unknown architecture {architecture!r} (a timm model name or transformers:<model_type>)")
    state = read_weights(path, allow_pickle)
    model = create_model(architecture, model_args or {})
    load_state(model, state, str(path))
    return model, TeacherInfo("file", architecture, str(path), None, sha256(path))


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
        fmt = format_of_directory(config_path.parent, ref)
        hf_hub_download(repo_id, WEIGHTS_NAME, revision=commit, local_files_only=cache_only)
        for optional in (CARD_NAME, *fmt.extra_files):  # the card for its license; the format's own files when there
            with contextlib.suppress(hub_errors.EntryNotFoundError, hub_errors.RemoteEntryNotFoundError,
                                     hub_errors.LocalEntryNotFoundError):
                hf_hub_download(repo_id, optional, revision=commit, local_files_only=cache_only)
    except CheckpointError:  # a refusal of ours (an unreachable reference, a config no format claims)
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
