"""Hub round trips with the real huggingface_hub client against the loopback Hub-protocol server."""

from __future__ import annotations

import json
import logging

import pytest
import timm
import torch
from huggingface_hub import ModelCard, hf_hub_download
from timm.models._hub import save_for_hf

import hf_netmerge as hm
from hf_netmerge.cli import main
from hf_netmerge.hub import load_teacher, push_folder

from conftest import QUIET, HUB_TOKEN, image_dataset, make_teacher

FAST = hm.MergeConfig(gate_epochs=1, finetune_epochs=1, batch_size=16)
X = torch.randn(3, 3, 28, 28)


@pytest.fixture(scope="module")
def data():
    return image_dataset(32, 4, seed=0)


def _publish_teacher(model, repo_id, tmp_path) -> str:
    folder = tmp_path / repo_id.replace("/", "__")
    save_for_hf(model, folder, safe_serialization=True)
    return push_folder(folder, repo_id).rsplit("/", 1)[-1]


@pytest.fixture
def merged(data):
    a, b = make_teacher("netmerge_lenet", {"num_classes": 4}, 0), make_teacher("netmerge_lenet", {"num_classes": 4}, 1)
    return hm.merge_models(a, b, data, data, FAST, run=QUIET)


def test_push_is_one_commit_and_loads_back_with_timm(hub, merged):
    url = merged.push_to_hub("user/lenet-merged")
    commits = hub.state.commits("user/lenet-merged")
    assert len(commits) == 2 and url.endswith(commits[-1].oid)  # the repo's empty initial commit + ours
    assert sorted(commits[-1].files) == ["README.md", "config.json", "model.safetensors", "netmerge_config.json"]
    loaded = timm.create_model("hf-hub:user/lenet-merged", pretrained=True).eval()
    torch.testing.assert_close(loaded(X), merged.student.eval()(X))
    assert merged.push_to_hub("user/lenet-merged") == url  # nothing changed: no second, empty commit
    assert len(hub.state.commits("user/lenet-merged")) == 2
    writes = [h for m, p, h in hub.state.log if m == "POST" and p.endswith("/commit/main")]
    assert writes and all(h.get("authorization") == f"Bearer {HUB_TOKEN}" for h in writes)


def test_push_to_a_branch_leaves_main_alone(hub, merged):
    merged.push_to_hub("user/branchy", revision="v1")
    repo = hub.state.repos["user/branchy"]
    assert repo.resolve("main").files == {} and "model.safetensors" in repo.resolve("v1").files
    loaded = timm.create_model("hf-hub:user/branchy@v1", pretrained=True).eval()
    torch.testing.assert_close(loaded(X), merged.student.eval()(X))


def test_teachers_by_id_and_revision_are_recorded_in_card_and_config(hub, data, tmp_path):
    a, b = make_teacher("netmerge_lenet", {"num_classes": 4}, 0), make_teacher("netmerge_lenet", {"num_classes": 4}, 1)
    _publish_teacher(a, "user/teacher-a", tmp_path)
    commit_b = _publish_teacher(b, "user/teacher-b", tmp_path)
    _publish_teacher(make_teacher("netmerge_lenet", {"num_classes": 4}, 7), "user/teacher-b", tmp_path)  # a newer main
    result = hm.merge_models("user/teacher-a", f"user/teacher-b@{commit_b}", data, data, FAST, run=QUIET)
    info_a, info_b = result.teachers
    assert info_a.source == info_b.source == "hf-hub"
    assert info_a.revision == hub.state.repos["user/teacher-a"].branches["main"] and info_b.revision == commit_b
    torch.testing.assert_close(result.metrics["teacher_b"]["loss"], hm.merge_models(
        a, b, data, data, FAST, run=QUIET).metrics["teacher_b"]["loss"])
    result.push_to_hub("user/merged-from-hub")
    card = ModelCard.load(hf_hub_download("user/merged-from-hub", "README.md"))
    assert card.data.base_model == ["user/teacher-a", "user/teacher-b"] and card.data.base_model_relation == "merge"
    assert card.data.library_name == "timm" and {"hf_netmerge", "model-merging"} <= set(card.data.tags)
    names = {r.metric_name for r in card.data.eval_results}
    assert names == {"accuracy (teacher A)", "accuracy (teacher B)", "accuracy (ensemble of the teachers)", "accuracy (student)"}
    assert "final λ" in card.text and "| conv1 | 12 | 6 |" in card.text and "Pašen" in card.text
    assert ModelCard(card.content).content == card.content


@pytest.mark.parametrize(
    "ref,match",
    [
        ("user/no-such-repo", "RepositoryNotFound"),
        ("user/teacher-a@no-such-branch", "RevisionNotFound"),
        ("user/card-only", "EntryNotFound"),
    ],
)
def test_missing_repo_revision_or_file_is_a_checkpoint_error(hub, tmp_path, ref, match):
    if not hub.state.repos.get("user/teacher-a"):
        _publish_teacher(make_teacher("netmerge_lenet", {"num_classes": 4}, 0), "user/teacher-a", tmp_path)
    if "user/card-only" not in hub.state.repos:
        (tmp_path / "card").mkdir()
        (tmp_path / "card" / "config.json").write_text('{"architecture": "netmerge_lenet", "num_classes": 4}')
        push_folder(tmp_path / "card", "user/card-only")
    with pytest.raises(hm.CheckpointError, match=match):
        load_teacher(ref)


def test_a_name_that_is_no_path_and_no_reachable_repo_fails_fast_and_says_so(hub, tmp_path, monkeypatch):
    import socket
    import time

    import huggingface_hub.constants

    _publish_teacher(make_teacher("netmerge_lenet", {"num_classes": 4}, 3), "user/cached-teacher", tmp_path)
    cached, _ = load_teacher("user/cached-teacher")  # now in the local Hub cache
    with socket.socket() as s:  # a loopback port nothing listens on: the Hub is unreachable
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", closed)
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    with pytest.raises(hm.UnreachableReferenceError, match="neither a local path .* nor a Hub repo that can be reached"):
        load_teacher("teachers/a")
    assert time.perf_counter() - start < 5  # one request, no download retries
    assert main(["inspect", "notamodel"]) == 2
    again, info = load_teacher("user/cached-teacher")  # unreachable but cached: the cache serves it
    torch.testing.assert_close(again(X), cached(X))
    assert info.source == "hf-hub"


def test_offline_and_not_cached_is_a_checkpoint_error(hub, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(hm.CheckpointError, match="Offline|offline|LocalEntryNotFound"):
        load_teacher("user/never-downloaded")


def test_cli_merge_and_push_never_reveal_the_token(hub, data, tmp_path, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    teachers = []
    for i, seed in enumerate((0, 1)):
        folder = tmp_path / f"t{i}"
        save_for_hf(make_teacher("netmerge_lenet", {"num_classes": 4}, seed), folder, safe_serialization=True)
        teachers.append(str(folder))
    data.save_to_disk(str(tmp_path / "data"))
    out = tmp_path / "student"
    code = main(["merge", *teachers, "--dataset", str(tmp_path / "data"), "--output-dir", str(out), "--set", "gate_epochs=1",
                 "--set", "finetune_epochs=1", "--set", "batch_size=16", "--push-to-hub", "user/from-cli", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr()
    assert "pushed: http://127.0.0.1" in printed.out
    assert len(hub.state.commits("user/from-cli")) == 2
    texts = [printed.out, printed.err, caplog.text]
    texts += [p.read_bytes().decode("utf-8", "replace") for p in tmp_path.rglob("*") if p.is_file()]
    assert not any(HUB_TOKEN in t for t in texts)
    assert main(["merge", *teachers, "--dataset", str(tmp_path / "data"), "--output-dir", str(out)]) == 2  # exists


def _cli_teachers_and_data(data, tmp_path) -> list[str]:
    """Two LeNet teachers saved in timm's layout and the image dataset saved to disk, as the CLI takes them."""
    teachers = []
    for i in range(2):
        save_for_hf(make_teacher("netmerge_lenet", {"num_classes": 4}, i), tmp_path / f"t{i}", safe_serialization=True)
        teachers.append(str(tmp_path / f"t{i}"))
    data.save_to_disk(str(tmp_path / "data"))
    return [*teachers, "--dataset", str(tmp_path / "data"), "--set", "gate_epochs=1", "--set", "finetune_epochs=0", "--set",
            "batch_size=16", "--no-progress"]


def test_a_hub_fault_is_a_typed_error_and_push_publishes_the_saved_student_later(hub, data, tmp_path, capsys):
    args = _cli_teachers_and_data(data, tmp_path)
    out = tmp_path / "student"
    hub.state.commit_status = 500
    try:
        assert main(["merge", *args, "--output-dir", str(out), "--push-to-hub", "user/faulty"]) == 2
    finally:
        hub.state.commit_status = None
    err = capsys.readouterr().err
    assert "'user/faulty'" in err and "HTTP 500" in err and f"hf-netmerge push {out} user/faulty" in err and "Traceback" not in err
    assert len(hub.state.commits("user/faulty")) == 1  # only the repo's initial commit: nothing partial
    assert main(["push", str(out), "user/faulty"]) == 0
    assert len(hub.state.commits("user/faulty")) == 2 and sorted(hub.state.commits("user/faulty")[-1].files) == sorted(
        p.name for p in out.iterdir())
    assert main(["push", str(out), "user/faulty"]) == 0  # unchanged: no empty commit
    assert len(hub.state.commits("user/faulty")) == 2
    (out / "README.md").write_text((out / "README.md").read_text() + "\nEdited.\n")
    assert main(["push", str(out), "user/faulty"]) == 0
    assert sorted(hub.state.commits("user/faulty")[-1].files) == sorted(p.name for p in out.iterdir())  # the tree stays whole
    assert len(hub.state.commits("user/faulty")) == 3
    assert main(["push", str(tmp_path / "t0"), "user/faulty"]) == 2
    assert "is not a saved student" in capsys.readouterr().err


def _closed_endpoint() -> str:
    """A loopback URL nothing listens on: every connection to it is refused, as when there is no route to the Hub."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_no_route_to_the_hub_is_one_typed_line_and_the_saved_student_stays(hub, data, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    args = _cli_teachers_and_data(data, tmp_path)
    out = tmp_path / "student"
    closed = _closed_endpoint()
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", closed)
    capsys.readouterr()
    assert main(["merge", *args, "--output-dir", str(out), "--push-to-hub", "user/offline"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("hf-netmerge: error: cannot reach the Hub")
    assert closed in err and "'user/offline'" in err and f"hf-netmerge push {out} user/offline" in err
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors", "netmerge_config.json"]
    with pytest.raises(hm.HubUnreachableError, match="cannot reach the Hub"):
        push_folder(out, "user/offline")
    assert main(["push", str(out), "user/offline"]) == 2 and "Traceback" not in capsys.readouterr().err
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.endpoint)
    assert "user/offline" not in hub.state.repos  # nothing reached the Hub
    assert main(["push", str(out), "user/offline"]) == 0  # online again, the saved student is published as it is
    assert sorted(hub.state.commits("user/offline")[-1].files) == sorted(p.name for p in out.iterdir())


def test_a_connection_lost_during_a_teacher_download_is_a_typed_error(hub, tmp_path):
    _publish_teacher(make_teacher("netmerge_lenet", {"num_classes": 4}, 5), "user/dropped", tmp_path)
    hub.state.drop_downloads = True
    try:
        with pytest.raises(hm.UnreachableReferenceError, match=f"'user/dropped'.*{hub.endpoint}"):
            load_teacher("user/dropped")
    finally:
        hub.state.drop_downloads = False
    model, info = load_teacher("user/dropped")  # the connection is back: nothing half-downloaded is kept
    assert info.source == "hf-hub" and model(X).shape == (3, 4)


def test_two_processes_print_and_push_once(hub, data, tmp_path):
    """``accelerate launch`` with two CPU processes, as a user runs it (a fork of this threaded test process could
    inherit a held lock): one printed table, one push, one commit."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["merge", *_cli_teachers_and_data(data, tmp_path), "--output-dir", str(tmp_path / "student"), "--push-to-hub", "user/two"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--dynamo_backend", "no", "--mixed_precision", "no", "--main_process_port", str(port), "-m", "hf_netmerge", *args]
    done = subprocess.run(launch, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("pushed: http://127.0.0.1") == 1 and done.stdout.count("saved the student to") == 1, done.stdout
    assert len(hub.state.commits("user/two")) == 2  # the repo's initial commit + exactly one


def test_the_card_takes_the_teachers_license_and_names_the_dataset(hub, tmp_path):
    from hf_netmerge.formats import save_network

    for i, license_id in enumerate(("mit", "mit", "apache-2.0")):
        folder = tmp_path / f"t{i}"  # 1-channel teachers: saved by hf_netmerge, whose config records in_chans on any timm
        save_network(make_teacher("netmerge_lenet", {"num_classes": 10, "in_chans": 1}, i), folder,
                     extra_files={"README.md": f"---\nlicense: {license_id}\n---\n# A teacher\n"})
        push_folder(folder, f"user/licensed-{i}")
    args = ["--dataset", "fashion_mnist", "--max-train-samples", "64", "--set", "gate_epochs=1", "--set", "finetune_epochs=0",
            "--set", "batch_size=32", "--no-progress"]
    assert main(["merge", "user/licensed-0", "user/licensed-1", *args, "--output-dir", str(tmp_path / "same")]) == 0
    card = ModelCard.load(tmp_path / "same" / "README.md")
    assert card.data.license == "mit" and card.data.datasets == ["zalando-datasets/fashion_mnist"]
    assert {r.dataset_type for r in card.data.eval_results} == {"zalando-datasets/fashion_mnist"}
    config = json.loads((tmp_path / "t2" / "config.json").read_text())
    config["pretrained_cfg"]["hf_hub_id"] = "org/where-t2-came-from"  # a local copy that names its Hub origin
    (tmp_path / "t2" / "config.json").write_text(json.dumps(config))
    assert main(["merge", "user/licensed-0", str(tmp_path / "t2"), *args, "--output-dir", str(tmp_path / "differ")]) == 0
    card = ModelCard.load(tmp_path / "differ" / "README.md")
    assert card.data.license is None  # the teachers disagree: nothing claimed
    assert card.data.base_model == ["user/licensed-0", "org/where-t2-came-from"] and card.data.base_model_relation == "merge"
    assert main(["merge", "user/licensed-0", str(tmp_path / "t2"), *args, "--output-dir", str(tmp_path / "chosen"),
                 "--license", "apache-2.0"]) == 0
    assert ModelCard.load(tmp_path / "chosen" / "README.md").data.license == "apache-2.0"


def test_transformers_loads_the_student_with_the_same_logits(hub, merged, data):
    transformers = pytest.importorskip("transformers")
    merged.push_to_hub("user/for-transformers")
    model = transformers.AutoModelForImageClassification.from_pretrained("user/for-transformers").eval()
    torch.testing.assert_close(model(pixel_values=X).logits, merged.student.eval()(X))
    predictions = transformers.pipeline("image-classification", model="user/for-transformers")(data[0]["image"])
    assert {p["label"] for p in predictions} <= {f"class_{i}" for i in range(4)}
