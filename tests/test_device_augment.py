"""The training augmentations batched on the device: torchvision's parameter ranges, each image its own draw, and
output statistics like the CPU path's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import PICTURES, TINY, make_folder, run_cli


def test_crop_boxes_keep_to_random_resized_crop_s_ranges():
    from sedense.data.device_augment import crop_boxes

    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(100, 150, (20000, 2), generator=g)  # photos' aspect ratios: the tries fit
    box = crop_boxes(sizes, (0.3, 1.0), g)
    x0, y0, w, h = box.unbind(1)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (w >= 1).all() and (h >= 1).all()
    assert (x0 + w <= sizes[:, 1]).all() and (y0 + h <= sizes[:, 0]).all()
    share = w * h / (sizes[:, 0] * sizes[:, 1])
    ratio = w / h
    drawn = share < 0.999  # the tries that fit (the fallback keeps the whole image)
    assert drawn.float().mean() > 0.95
    assert share[drawn].min() > 0.27 and share[drawn].max() < 1.03  # (0.3, 1) up to rounding to pixels
    assert ratio[drawn].min() > 0.7 and ratio[drawn].max() < 1.4
    # The same distribution as torchvision's own draw on the same sizes (larger areas fit less often: both).
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(0)
    theirs, their_ratio = [], []
    for hw in sizes[:4000].tolist():
        _, _, h_, w_ = RandomResizedCrop.get_params(torch.zeros(1, *hw), [0.3, 1.0], [3 / 4, 4 / 3])
        theirs.append(h_ * w_ / (hw[0] * hw[1]))
        their_ratio.append(w_ / h_)
    assert float(share.mean()) == pytest.approx(float(np.mean(theirs)), abs=0.015)
    assert float(ratio.log().std()) == pytest.approx(float(np.std(np.log(their_ratio))), rel=0.1)


def test_every_image_gets_its_own_parameters():
    from scipy.stats import binomtest, kstest

    from sedense.data.device_augment import DeviceAugment

    aug = DeviceAugment(32, (0.5,) * 3, (0.25,) * 3, (0.4, 1.0), hflip=0.5, vflip=0.3, rotation=15, color_jitter=0.2)
    p = aug.parameters(torch.full((4000, 2), 100), torch.Generator().manual_seed(1))
    assert binomtest(int(p["hflip"].sum()), 4000, 0.5).pvalue > 1e-3
    assert binomtest(int(p["vflip"].sum()), 4000, 0.3).pvalue > 1e-3
    assert kstest(p["angle"].numpy(), "uniform", args=(-15, 30)).pvalue > 1e-3
    assert kstest(p["jitter"][:, 0].numpy(), "uniform", args=(0.8, 0.4)).pvalue > 1e-3
    assert p["angle"].unique().numel() == 4000  # no two images share a draw
    assert abs(np.corrcoef(p["angle"].numpy(), p["jitter"][:, 1].numpy())[0, 1]) < 0.06


def test_the_whole_image_unflipped_is_a_plain_resize_and_a_flip_is_its_mirror():
    from sedense.data.device_augment import DeviceAugment

    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (2, 3, 48, 64), dtype=torch.uint8, generator=g)
    sizes = torch.tensor([[48, 64], [40, 48]])
    aug = DeviceAugment(24, (0.0,) * 3, (1.0,) * 3, (1.0, 1.0), hflip=0.0)
    params = aug.parameters(sizes, g)
    params["box"] = torch.tensor([[0.0, 0.0, 64, 48], [0.0, 0.0, 48, 40]])
    out = aug(images, sizes, params=params)
    expected = torch.nn.functional.interpolate(images[:1].float() / 255, size=(24, 24), mode="bilinear",
                                               align_corners=False)
    torch.testing.assert_close(out[:1], expected, atol=1e-4, rtol=0)
    inner = torch.nn.functional.interpolate(images[1:, :, :40, :48].float() / 255, size=(24, 24), mode="bilinear",
                                            align_corners=False)
    torch.testing.assert_close(out[1:, :, 1:-1, 1:-1], inner[:, :, 1:-1, 1:-1], atol=1e-4, rtol=0)  # padding unseen
    params["hflip"] = torch.tensor([True, True])
    torch.testing.assert_close(aug(images, sizes, params=params), out.flip(-1), atol=1e-4, rtol=0)


def test_output_statistics_match_the_cpu_path():
    from torchvision.transforms import v2 as T

    from sedense.data.device_augment import DeviceAugment, pad_collate
    from sedense.data.transforms import train_transform
    from sedense.preprocessing import Preprocessing

    rng = np.random.default_rng(3)
    photos = []
    for _ in range(6):  # smooth colour fields with an object, 96x72: photo-like statistics
        base = Image.fromarray(rng.integers(0, 255, (4, 5, 3), dtype=np.uint8)).resize((96, 72), Image.BICUBIC)
        pixels = np.asarray(base).copy()
        pixels[20:50, 30:70] = rng.integers(0, 255, 3)
        photos.append(Image.fromarray(pixels))
    pre = Preprocessing(32)
    options = dict(crop_scale=(0.4, 1.0), hflip=0.5, vflip=0.5, rotation=15, color_jitter=0.2)
    cpu = train_transform(pre, 32, **options)
    torch.manual_seed(0)
    cpu_out = torch.stack([cpu(p) for _ in range(150) for p in photos])
    batch, _, sizes = pad_collate([(T.PILToTensor()(p), 0) for _ in range(150) for p in photos])
    device_out = DeviceAugment(32, pre.mean, pre.std, **options)(batch, sizes, torch.Generator().manual_seed(0))
    assert device_out.shape == cpu_out.shape
    for c in range(3):
        assert float(device_out[:, c].mean()) == pytest.approx(float(cpu_out[:, c].mean()), abs=0.06)
        assert float(device_out[:, c].std()) == pytest.approx(float(cpu_out[:, c].std()), rel=0.06)
    black = float(-torch.tensor(pre.mean)[0] / pre.std[0])  # the rotation's corners
    share = lambda x: float((x[:, 0] - black).abs().lt(1e-3).float().mean())  # noqa: E731
    assert share(device_out) == pytest.approx(share(cpu_out), abs=0.02)


def test_fit_augments_on_the_device_and_refuses_it_without_the_cache(tmp_path):
    make_folder(tmp_path / "data", {"cardboard": 8, "glass": 8}, size=40)
    run_cli(["fit", *TINY, *PICTURES, "--data.root", "data", "--data.cache", "true", "--data.augment_on", "device",
             "--data.rotation", "10", "--data.color_jitter", "0.2", "--trainer.max_epochs", "1"], tmp_path)
    assert (tmp_path / "lightning_logs" / "version_0" / "train_batch.png").stat().st_size > 0
    bad = run_cli(["fit", *TINY, "--data.root", "data", "--data.augment_on", "device"], tmp_path, check=False)
    assert bad.returncode == 2
    assert "data.augment_on: device works on the image cache: add data.cache: true" in bad.stderr
