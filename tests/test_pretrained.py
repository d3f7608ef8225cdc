"""Transfer learning, offline: weight files are written by the tests into a temporary TORCH_HOME."""

import socket

import pytest
import torch
import torchvision

from conftest import make_folder
from sedense.commands import main
from sedense.errors import ConfigError
from sedense.models import build_model
from sedense.models.pretrained import cached_weights_path, load_backbone, load_official_state_dict, remap_legacy_keys

FAST = [
    "--data.preprocessing.image_size", "32", "--data.batch_size", "4", "--data.num_workers", "0",
    "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.max_epochs", "1",
    "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
]


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


@pytest.fixture
def cached_densenet121(torch_home):
    """A seeded densenet121 state dict saved where torchvision would cache the official weights."""
    torch.manual_seed(121)
    state = torchvision.models.densenet121().state_dict()
    with torch.no_grad():  # make the BN statistics non-trivial, so a test can see them move
        for key, value in state.items():
            if key.endswith("running_mean"):
                value.copy_(torch.randn_like(value) * 0.01)
            elif key.endswith("running_var"):
                value.copy_(torch.rand_like(value) * 0.5 + 0.75)
    path = cached_weights_path("densenet121")
    assert str(path).startswith(str(torch_home)) and path.name == "densenet121-a639ec97.pth"
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return state


def _fit(tmp_path, monkeypatch, *args):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "photos"
    if not data.exists():
        make_folder(data, {"cardboard": 6, "glass": 6}, size=40)
    main(["fit", *FAST, "--data.root", str(data), *args])
    runs = sorted(tmp_path.glob("lightning_logs/version_*"), key=lambda p: int(p.name.split("_")[1]))
    return torch.load(runs[-1] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True), runs[-1]


def test_cached_weights_are_used_without_network(cached_densenet121, offline):
    state = load_official_state_dict("densenet121")
    assert state.keys() == cached_densenet121.keys()
    torch.testing.assert_close(state["features.conv0.weight"], cached_densenet121["features.conv0.weight"])


def test_offline_error_names_the_file_and_folder(torch_home, offline, tmp_path, monkeypatch, capsys):
    with pytest.raises(ConfigError) as info:
        load_official_state_dict("densenet121")
    message = str(info.value)
    assert "densenet121-a639ec97.pth" in message and str(torch_home / "hub" / "checkpoints") in message
    # The same through the command: one line, exit code 2, no traceback.
    with pytest.raises(SystemExit) as exit_info:
        _fit(tmp_path, monkeypatch, "--model.arch", "densenet121", "--model.pretrained", "true")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "densenet121-a639ec97.pth" in err.strip().splitlines()[-1]


def test_frozen_densenet121_keeps_backbone_and_bn_statistics(cached_densenet121, offline, tmp_path, monkeypatch):
    ckpt, run = _fit(
        tmp_path, monkeypatch, "--model.arch", "densenet121", "--model.pretrained", "true",
        "--finetuning.freeze", "true",
        "--model.optimizer", "sgd", "--model.lr", "0.1",
    )
    state = ckpt["state_dict"]
    for key, value in cached_densenet121.items():
        if key.startswith("features."):
            torch.testing.assert_close(state[f"net.{key}"], value, msg=f"{key} changed")
    head = state["net.classifier.weight"]
    assert head.shape == (2, 1024)
    assert ckpt["global_step"] == 2
    # The weights' own preprocessing became the data's.
    assert ckpt["datamodule_hyper_parameters"]["preprocessing"]["eval_crop"] == pytest.approx(224 / 256)


def test_head_changes_in_a_frozen_training_step(cached_densenet121, offline):
    from sedense.models.pretrained import load_initial_weights
    from sedense.module import ImageClassifier

    model = ImageClassifier(class_names=["a", "b", "c"], arch="densenet121", pretrained=True)
    load_initial_weights(model.net, model.hparams, model.class_names)
    from sedense.callbacks.finetuning import FreezeBackbone

    freezer = FreezeBackbone(freeze=True)
    freezer.freeze_before_training(model)
    model.train()
    freezer.on_train_batch_start(None, model, None, 0)
    head_before = model.net.classifier.weight.clone()
    with torch.no_grad():
        assert model.net.features(torch.randn(2, 3, 32, 32)).abs().sum() > 0
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    opt.step()
    assert not torch.equal(head_before, model.net.classifier.weight)
    for key, value in cached_densenet121.items():
        if key.startswith("features."):
            torch.testing.assert_close(model.net.state_dict()[key], value)
    assert all(not p.requires_grad for p in model.net.features.parameters())


def test_se_densenet121_receives_every_shared_key(cached_densenet121, offline, tmp_path, monkeypatch):
    ckpt, _ = _fit(
        tmp_path, monkeypatch, "--model.arch", "se_densenet121", "--model.pretrained", "true",
        "--finetuning.freeze", "true",
    )
    state = ckpt["state_dict"]
    shared = [k for k in cached_densenet121 if not k.startswith("classifier.")]
    assert len(shared) > 700
    for key in shared:
        torch.testing.assert_close(state[f"net.{key}"], cached_densenet121[key], msg=key)
    assert any(".se." in k for k in state)


def test_legacy_torchvision_keys_are_renamed(cached_densenet121):
    # Like torchvision's 2017 files: `norm.1`-style names and no `num_batches_tracked`.
    legacy = {
        k.replace("norm1.", "norm.1.").replace("conv2.", "conv.2."): v
        for k, v in cached_densenet121.items() if not k.endswith("num_batches_tracked")
    }
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    renamed = remap_legacy_keys(legacy)
    assert renamed.keys() <= cached_densenet121.keys() and "features.denseblock1.denselayer1.norm1.weight" in renamed
    model = build_model("se_densenet121", num_classes=4)
    assert load_backbone(model, legacy, "legacy file") == len(legacy) - 2
    torch.testing.assert_close(
        model.state_dict()["features.denseblock2.denselayer3.conv2.weight"],
        cached_densenet121["features.denseblock2.denselayer3.conv2.weight"],
    )


def test_weights_of_another_depth_fail_loudly_naming_keys():
    state = torchvision.models.densenet121().state_dict()
    with pytest.raises(ConfigError, match=r"do not fit.*(missing|unexpected)"):
        load_backbone(build_model("se_densenet169", num_classes=3), state, "densenet121 file")


def test_weights_from_a_sedense_checkpoint_of_another_run(tmp_path, monkeypatch, offline):
    tiny = ["--model.arch", "se_densenet_bc100", "--model.block_config", "[2, 2]", "--model.growth_rate", "8",
            "--model.num_init_features", "8"]
    first, run = _fit(tmp_path, monkeypatch, *tiny)
    other = make_folder(tmp_path / "other", {"paper": 5, "plastic": 5, "trash": 5}, size=40)
    second, _ = _fit(
        tmp_path, monkeypatch, *tiny, "--data.root", str(other), "--finetuning.freeze", "true",
        "--model.weights", str(run / "checkpoints" / "last.ckpt"),
    )
    assert second["hyper_parameters"]["class_names"] == ["paper", "plastic", "trash"]
    for key, value in first["state_dict"].items():
        if key.startswith("net.features."):
            torch.testing.assert_close(second["state_dict"][key], value, msg=key)
    assert second["state_dict"]["net.classifier.weight"].shape[0] == 3


def test_unfreezing_adds_the_backbone_at_a_lower_learning_rate(tmp_path, monkeypatch):
    tiny = ["--model.arch", "se_densenet_bc100", "--model.block_config", "[2, 2]", "--model.growth_rate", "8",
            "--model.num_init_features", "8"]
    first, run = _fit(tmp_path, monkeypatch, *tiny)
    second, _ = _fit(
        tmp_path, monkeypatch, *tiny, "--model.weights", str(run / "checkpoints" / "last.ckpt"),
        "--finetuning.freeze", "true", "--finetuning.unfreeze_at_epoch", "1", "--trainer.max_epochs", "2",
        "--model.optimizer", "sgd", "--model.lr", "0.05",
    )
    groups = second["optimizer_states"][0]["param_groups"]
    assert len(groups) == 3  # decay, no-decay, and the unfrozen backbone
    # The backbone is on the head's schedule, at its share: the same cosine, a tenth of the learning rate.
    assert groups[2]["initial_lr"] == pytest.approx(0.1 * groups[0]["initial_lr"])
    assert groups[2]["lr"] == pytest.approx(0.1 * groups[0]["lr"]) and groups[0]["lr"] < groups[0]["initial_lr"]
    after = second["state_dict"]
    changed = [k for k, v in first["state_dict"].items()
               if k.startswith("net.features.") and v.is_floating_point() and not torch.equal(v, after[k])]
    assert changed
