"""The demo's digit classifier: shipped weights, accuracy on real held-out digits, the extractor protocol."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tb_core.errors import InputError
from tb_train.demo.data import demo_split, demo_splits, ensure_demo_images
from tb_train.demo.digits import (DIGITS_WEIGHTS, FEATURE_DIM, DigitTrainConfig, DigitExtractor, load_digit_extractor,
                             real_images, split_accuracy, train_classifier)


def test_splits_are_disjoint_stratified_and_fixed():
    splits = demo_splits()
    sets = [set(v.tolist()) for v in splits.values()]
    assert sum(map(len, sets)) == 1797 and len(set.union(*sets)) == 1797
    assert {k: len(v) for k, v in splits.items()} == {"train": 1205, "heldout": 296, "test": 296}
    for name in ("heldout", "test"):
        counts = np.bincount(demo_split(name)[1], minlength=10)
        assert counts.min() >= 29, (name, counts)
    assert all(np.array_equal(a, b) for a, b in zip(splits.values(), demo_splits().values()))


def test_shipped_classifier_accuracy_on_real_heldout_and_test():
    ext = load_digit_extractor()
    assert ext.name == "digits-cnn"
    assert split_accuracy(ext, "heldout") >= 0.95
    assert split_accuracy(ext, "test") >= 0.95


def test_extractor_protocol_shapes_and_resize():
    ext = load_digit_extractor()
    images, labels = real_images("test")
    out = ext(images[:7])
    assert out["pool"].shape == (7, FEATURE_DIM) and out["logits"].shape == (7, 10)
    assert out["pool"].dtype == torch.float32 and bool((out["pool"] >= 0).all())  # post-ReLU features
    big = torch.nn.functional.interpolate(images[:7].float(), scale_factor=2, mode="nearest").round().to(torch.uint8)
    assert (ext(big)["logits"].argmax(1) == out["logits"].argmax(1)).float().mean() >= 6 / 7
    with pytest.raises(InputError, match="uint8"):
        ext(images[:2].float())


def test_missing_or_wrong_weights_file_is_one_line_error(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_digit_extractor(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="not a digit classifier"):
        load_digit_extractor(bad)


@pytest.mark.slow
def test_retraining_reproduces_the_shipped_accuracy():
    model = train_classifier(DigitTrainConfig(epochs=10))
    assert split_accuracy(DigitExtractor(model), "heldout") >= 0.95


def test_split_image_folder_refuses_another_split(tmp_path):
    folder = ensure_demo_images(tmp_path / "imgs", split="test")
    assert sum(1 for _ in folder.rglob("*.png")) == 296
    assert ensure_demo_images(folder, split="test") == folder
    with pytest.raises(FileExistsError, match="'test', not 'train'"):
        ensure_demo_images(folder, split="train")
    assert DIGITS_WEIGHTS.stat().st_size < 400_000
