"""Train-time augmentation and the recorded preprocessing: train views vary, eval views do not; fixed seeds reproduce
batches; two processes read disjoint shards; a saved student's config.json rebuilds its evaluation inputs exactly."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from accelerate import debug_launcher
from PIL import Image
from torchvision.transforms import functional as TF

import hf_netmerge as hm
from hf_netmerge.config import AugmentConfig
from hf_netmerge.data import (
    TensorAugment,
    TensorBatchDataset,
    fashion_mnist,
    fashion_mnist_images,
    make_loader,
    mnist,
    mnist_images,
    prepare_dataset,
    training_view,
)
from hf_netmerge.training import make_accelerator

from conftest import QUIET, image_dataset, make_teacher

LENET = {"num_classes": 4}


def _views(data, augment=AugmentConfig(), seed=0, image_size=None, **model_kwargs):
    model = timm.create_model("netmerge_lenet", **{**LENET, **model_kwargs})
    evaluation = prepare_dataset(data, model=model, task="classification", num_classes=model.num_classes, image_size=image_size)
    return evaluation, training_view(evaluation, augment, seed)


def test_train_view_of_pil_images_varies_between_epochs_and_the_eval_view_does_not():
    evaluation, train = _views(image_dataset(8, 4, seed=0))
    assert not torch.equal(train[0][0], train[0][0])  # a new crop / flip each time the image is read
    assert torch.equal(evaluation[0][0], evaluation[0][0]) and train[0][0].shape == evaluation[0][0].shape == (3, 28, 28)
    _, unaugmented = _views(image_dataset(8, 4, seed=0), AugmentConfig(mode="none"))
    assert torch.equal(unaugmented[0][0], evaluation[0][0])


def test_large_images_get_timms_training_transform():
    _, train = _views(image_dataset(4, 4, size=80), image_size=80, img_size=80)
    names = [type(t).__name__ for t in train.transform.transforms]
    assert names[:2] == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip"] and "ColorJitter" in names


def test_tensor_augment_is_a_padded_crop_and_flip_keyed_by_epoch_and_example():
    images = torch.randn(6, 2, 5, 7)
    augment = TensorAugment(pad=2, hflip=0.5, seed=3, fill=torch.tensor([-1.0, -2.0]))
    out = augment(images, torch.arange(6), epoch=0, size=6)
    offsets, flips = augment._draws(0, 6, images.device)
    for i in range(6):  # the reference: torchvision's pad, crop and flip of one image
        padded = torch.cat([TF.pad(images[i, c : c + 1], 2, fill=f) for c, f in enumerate((-1.0, -2.0))])
        expected = padded[:, offsets[i, 0] : offsets[i, 0] + 5, offsets[i, 1] : offsets[i, 1] + 7]
        assert torch.equal(out[i], expected.flip(-1) if flips[i] else expected)
    # the same example gets the same draw whatever batch it is read in; another epoch draws anew
    assert torch.equal(augment(images[[4, 1]], torch.tensor([4, 1]), epoch=0, size=6), out[[4, 1]])
    assert not torch.equal(augment(images, torch.arange(6), epoch=1, size=6), out)


def test_in_memory_images_are_augmented_per_epoch_through_the_loader():
    gen = torch.Generator().manual_seed(0)
    data = TensorBatchDataset(torch.randn(32, 1, 8, 8, generator=gen), torch.randint(0, 4, (32,), generator=gen))
    train = training_view(data, AugmentConfig(), seed=0)
    loader = make_loader(train, 8, shuffle=False)
    first = torch.cat([x for x, _ in loader])
    train.set_epoch(1)
    second = torch.cat([x for x, _ in loader])
    assert not torch.equal(first, second) and not torch.equal(first, data.inputs)
    train.set_epoch(0)
    assert torch.equal(torch.cat([x for x, _ in loader]), first)
    assert training_view(TensorBatchDataset(torch.randn(8, 1), torch.randn(8, 1)), AugmentConfig(), 0).augment is None  # not images


@pytest.mark.parametrize("workers", [0, 2])
def test_a_fixed_seed_reproduces_the_augmented_batches(workers):
    _, train = _views(image_dataset(24, 4, seed=1))

    def batches():
        torch.manual_seed(0)
        return torch.cat([x for x, _ in make_loader(train, 8, shuffle=True, seed=5, num_workers=workers)])

    first, second = batches(), batches()
    assert torch.equal(first, second)


def _shards(out: str) -> None:
    torch.set_num_threads(1)
    accelerator = make_accelerator("no", cpu=True)
    evaluation, _ = _views(image_dataset(32, 4, seed=2))  # the eval view: an image's pixels name it
    loader = accelerator.prepare(make_loader(evaluation, 8, shuffle=True, seed=0))
    seen = torch.cat([x.flatten(1) for x, _ in loader])
    Path = __import__("pathlib").Path
    safetensors.torch.save_file({"seen": seen.contiguous()}, str(Path(out) / f"rank{accelerator.process_index}.safetensors"))
    accelerator.end_training()


def test_two_processes_read_disjoint_shards_of_the_training_set(tmp_path):
    debug_launcher(_shards, args=(str(tmp_path),), num_processes=2)
    ranks = [safetensors.torch.load_file(str(tmp_path / f"rank{r}.safetensors"))["seen"] for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 16
    assert not any(torch.equal(a, b) for a in ranks[0] for b in ranks[1])
    evaluation, _ = _views(image_dataset(32, 4, seed=2))
    every = {tuple(evaluation[i][0].flatten().tolist()) for i in range(32)}
    assert {tuple(row.tolist()) for rank in ranks for row in rank} == every


def _reloaded_transform(directory):
    model = timm.create_model(f"local-dir:{directory}", pretrained=True)
    return timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))


@pytest.mark.parametrize("name", ["fashion_mnist", "mnist"])
def test_a_student_records_the_preprocessing_of_a_built_in_dataset(name, tmp_path):
    if name == "mnist":
        pytest.importorskip("zarr")
    elif not os.path.isdir("/usr/share/datasets/fashion-mnist"):
        pytest.skip("apt-get install dataset-fashion-mnist")
    data, (images, _) = (fashion_mnist("test"), fashion_mnist_images("test")) if name == "fashion_mnist" else (mnist("test"), mnist_images("test"))
    kwargs = {"num_classes": 10, "in_chans": 1}
    a, b = make_teacher("netmerge_lenet", kwargs, 0), make_teacher("netmerge_lenet", kwargs, 1)
    small = hm.data.subset(data, torch.arange(64))
    config = hm.MergeConfig(gate_epochs=1, finetune_epochs=1, batch_size=32, augment=AugmentConfig(hflip=0.25))
    hm.merge_models(a, b, small, small, config, output=tmp_path / "student", run=QUIET)
    transform = _reloaded_transform(tmp_path / "student")
    rebuilt = torch.stack([transform(Image.fromarray(images[i])) for i in range(16)])
    assert torch.equal(rebuilt, data.inputs[:16])
    record = json.loads((tmp_path / "student" / "netmerge_config.json").read_text())
    assert record["merge_config"]["augment"]["hflip"] == 0.25 and record["preprocessing"]["mean"] == [data.preprocessing.mean[0]]
    card = (tmp_path / "student" / "README.md").read_text()
    assert "hflip 0.25" in card and "cannot feed this 1-channel model" in card and 'convert("L")' in card


def test_a_student_records_the_preprocessing_of_an_hf_dataset(tmp_path):
    data = image_dataset(32, 4, size=36, seed=3)
    a, b = make_teacher("netmerge_lenet", LENET, 0), make_teacher("netmerge_lenet", LENET, 1)
    config = hm.MergeConfig(gate_epochs=1, finetune_epochs=1, batch_size=16, augment=AugmentConfig(mode="none"))
    hm.merge_models(a, b, data, data, config, output=tmp_path / "student", run=QUIET)
    evaluation, _ = _views(data)
    transform = _reloaded_transform(tmp_path / "student")
    rebuilt = torch.stack([transform(data[i]["image"].convert("RGB")) for i in range(8)])
    assert torch.equal(rebuilt, torch.stack([evaluation[i][0] for i in range(8)]))
    card = (tmp_path / "student" / "README.md").read_text()
    assert "No train-time augmentation." in card and 'pipeline("image-classification"' in card


def test_augment_refuses_bad_values_and_reads_a_mode_alone():
    assert hm.MergeConfig.from_dict({"augment": "none"}).augment == AugmentConfig(mode="none")
    for bad in ({"mode": "strong"}, {"hflip": 2.0}, {"scale": [1.0, 0.5]}, {"pad": -1}):
        with pytest.raises(hm.ConfigError):
            AugmentConfig.from_dict(bad)
    assert np.allclose(AugmentConfig().ratio, [0.75, 4 / 3])


def test_merge_command_takes_augment_and_workers(tmp_path):
    from timm.models import save_for_hf

    from hf_netmerge.cli import main

    for i in range(2):
        save_for_hf(make_teacher("netmerge_lenet", LENET, i), tmp_path / f"t{i}", safe_serialization=True)
    image_dataset(32, 4, seed=4).save_to_disk(str(tmp_path / "data"))
    args = ["merge", str(tmp_path / "t0"), str(tmp_path / "t1"), "--dataset", str(tmp_path / "data"), "--output-dir", str(tmp_path / "out"),
            "--augment", "none", "--num-workers", "1", "--set", "gate_epochs=1", "--set", "finetune_epochs=0", "--set", "batch_size=16",
            "--no-progress"]
    assert main(args) == 0
    config = json.loads((tmp_path / "out" / "netmerge_config.json").read_text())["merge_config"]
    assert config["augment"]["mode"] == "none" and config["num_workers"] == 1
