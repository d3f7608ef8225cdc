import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_folder, make_image
from sedense.data import ImageFolderDataModule, load_image, scan_dataset, stratified_split, train_transform
from sedense.errors import ConfigError, DataError
from sedense.preprocessing import Preprocessing


def test_split_is_stratified_disjoint_and_complete(image_folder):
    root = image_folder({"cardboard": 20, "glass": 10, "metal": 5})
    split = scan_dataset(root, 0.2, 42)
    assert split.class_names == ["cardboard", "glass", "metal"]
    train, val = set(split.train), set(split.val)
    assert not train & val
    assert len(train | val) == 35
    assert Counter(c for _, c in split.val) == {"cardboard": 4, "glass": 2, "metal": 1}
    assert all(p.parent.name == c for p, c in split.train + split.val)


def test_split_depends_on_seed_only():
    classes = {"a": [Path(f"a/{i}.png") for i in range(30)], "b": [Path(f"b/{i}.png") for i in range(30)]}
    shuffled = {k: list(reversed(v)) for k, v in classes.items()}
    assert stratified_split(classes, 0.2, 1) == stratified_split(shuffled, 0.2, 1)
    assert stratified_split(classes, 0.2, 1) != stratified_split(classes, 0.2, 2)


def test_split_is_identical_in_another_process(image_folder):
    root = image_folder({"cardboard": 12, "glass": 9})
    code = (
        "import sys; from pathlib import Path; from sedense.data import scan_dataset; "
        f"s = scan_dataset(Path({str(root)!r}), 0.25, 7); print([str(p) for p, _ in s.val])"
    )
    outs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={"PYTHONHASHSEED": seed, "PATH": ""}).stdout
        for seed in ("1", "2")
    }
    assert len(outs) == 1
    assert outs.pop().strip() == str([str(p) for p, _ in scan_dataset(root, 0.25, 7).val])


def test_train_val_test_layout_is_used_as_given(tmp_path):
    make_folder(tmp_path / "d" / "train", {"a": 4, "b": 3})
    make_folder(tmp_path / "d" / "val", {"a": 2, "b": 2})
    make_folder(tmp_path / "d" / "test", {"b": 2})
    split = scan_dataset(tmp_path / "d", 0.2, 0)
    assert split.class_names == ["a", "b"]
    assert len(split.train) == 7 and len(split.val) == 4 and len(split.test) == 2
    assert all("/train/" in str(p) for p, _ in split.train)
    assert all("/val/" in str(p) for p, _ in split.val)


def _error(root: Path, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        scan_dataset(root, 0.2, 0)
    return str(info.value)


def test_error_missing_folder(tmp_path):
    assert "does not exist" in _error(tmp_path / "nope")


def test_error_no_images(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("x")
    assert "no images found" in _error(tmp_path)


def test_error_empty_class_folder(tmp_path):
    make_folder(tmp_path, {"a": 3, "b": 3})
    (tmp_path / "c").mkdir()
    message = _error(tmp_path)
    assert "holds no usable images" in message and str(tmp_path / "c") in message


def test_error_single_class(tmp_path):
    make_folder(tmp_path, {"a": 3})
    assert "two or more" in _error(tmp_path)


def test_error_train_and_val_classes_differ(tmp_path):
    make_folder(tmp_path / "train", {"a": 3, "b": 3})
    make_folder(tmp_path / "val", {"a": 2, "c": 2})
    message = _error(tmp_path)
    assert "different classes" in message and "'b'" in message and "'c'" in message


def test_error_test_folder_with_unknown_class(tmp_path):
    make_folder(tmp_path / "train", {"a": 3, "b": 3})
    make_folder(tmp_path / "val", {"a": 2, "b": 2})
    make_folder(tmp_path / "test", {"a": 1, "zebra": 1})
    assert "zebra" in _error(tmp_path)


def test_test_root_is_matched_to_the_model_classes_by_name(tmp_path):
    make_folder(tmp_path / "extra", {"glass": 2, "metal": 3})
    dm = ImageFolderDataModule(test_root=str(tmp_path / "extra"), preprocessing=Preprocessing(16), num_workers=0)

    class FakeTrainer:
        lightning_module = type("M", (), {"class_names": ["cardboard", "glass", "metal"]})()

    dm.trainer = FakeTrainer()
    dm.setup("test")
    assert sorted(t for _, t in dm.test_set.samples) == [1, 1, 2, 2, 2]


def test_hidden_files_and_non_images_are_ignored(tmp_path):
    make_folder(tmp_path, {"a": 2, "b": 2})
    (tmp_path / "a" / ".DS_Store").write_bytes(b"\0\1")
    (tmp_path / "a" / "readme.txt").write_text("x")
    (tmp_path / ".hidden_class").mkdir()
    split = scan_dataset(tmp_path, 0.5, 0)
    assert split.class_names == ["a", "b"]
    assert len(split.train) + len(split.val) == 4


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "I;16", "CMYK"])
def test_images_of_any_mode_load_as_rgb(tmp_path, mode):
    if mode == "I;16":
        path = tmp_path / "deep.png"
        Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 15).astype(np.uint16)).save(path)
    else:
        path = make_image(tmp_path / f"img.{'jpg' if mode == 'CMYK' else 'png'}", (10, 200, 30), mode=mode)
    img = load_image(path)
    assert img.mode == "RGB" and img.size[0] > 0
    if mode == "I;16":
        assert np.asarray(img).max() > 100  # scaled down from 16 bits, not clipped to white or black


def test_transforms_give_normalised_square_tensors(tmp_path):
    img = load_image(make_image(tmp_path / "x.png", (128, 128, 128), size=40))
    for train in (True, False):
        out = (train_transform(Preprocessing(24)) if train else Preprocessing(24).eval_transform())(img)
        assert out.shape == (3, 24, 24) and out.dtype == torch.float32
        assert out.abs().max() < 5


@pytest.mark.parametrize("kwargs", [dict(val_split=1.0), dict(batch_size=0), dict(verify="deep")])
def test_bad_data_options(kwargs):
    with pytest.raises(DataError):
        ImageFolderDataModule(**kwargs)


@pytest.mark.parametrize("kwargs", [dict(image_size=0), dict(eval_crop=0), dict(std=(0.2, 0.2, 0.0))])
def test_bad_preprocessing_options(kwargs):
    with pytest.raises(ConfigError, match="data.preprocessing"):
        Preprocessing(**kwargs)


def test_preprocessing_travels_through_a_checkpoint_and_an_export_sidecar(tmp_path):
    pre = Preprocessing(48, 0.9, (0.5, 0.4, 0.3), (0.2, 0.3, 0.4))
    assert Preprocessing.from_checkpoint({"datamodule_hyper_parameters": {"preprocessing": pre.to_dict()}}) == pre
    legacy = {"datamodule_hyper_parameters": {"image_size": 48, "eval_crop": 0.9, "mean": [0.5, 0.4, 0.3],
                                              "std": [0.2, 0.3, 0.4], "batch_size": 8}}
    assert Preprocessing.from_checkpoint(legacy) == pre  # checkpoints from before the preprocessing option
    (tmp_path / "preprocessing.json").write_text(json.dumps(pre.sidecar(6, "model.onnx")))
    assert Preprocessing.from_sidecar(tmp_path / "preprocessing.json") == pre
    assert pre.sidecar(6, "model.onnx")["resize_shorter_side"] == 53
    img = load_image(make_image(tmp_path / "x.png", (128, 128, 128), size=80))
    assert pre.eval_transform()(img).shape == (3, 48, 48)
