import copy

import pytest
import torch
import torchvision

from sedense.models import PRESETS, SEDenseNet, SEModule, build_model, list_models, se_hidden_channels


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", sorted(PRESETS))
def test_every_preset_classifies(arch):
    model = build_model(arch, num_classes=7).eval()
    size = 16 if PRESETS[arch].get("small_inputs") else 32
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_plain_densenet121_matches_torchvision_exactly():
    ours = build_model("se_densenet121", num_classes=1000, se_reduction=0)
    theirs = torchvision.models.densenet121()
    assert n_params(ours) == n_params(theirs) == 7_978_856
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), theirs.eval()(x))


def test_se_adds_only_se_keys_to_torchvision_layout():
    ours = set(build_model("se_densenet121", num_classes=1000).state_dict())
    theirs = set(torchvision.models.densenet121().state_dict())
    assert theirs <= ours
    extra = ours - theirs
    assert extra and all(".se." in k for k in extra)
    assert "features.denseblock1.denselayer1.norm1.weight" in ours
    assert "features.transition1.conv.weight" in ours
    assert "features.norm5.weight" in ours


def test_se_width_is_never_zero():
    assert se_hidden_channels(12, 16) >= 1
    assert se_hidden_channels(256, 16) == 16
    se = SEModule(12, 16)
    assert se.fc1.out_features >= 1
    x = torch.randn(2, 12, 4, 4)
    assert se(x).shape == x.shape


def test_se_reduction_zero_turns_se_off():
    model = build_model("se_densenet_bc100", num_classes=3, block_config=(2, 2), se_reduction=0)
    assert not any(isinstance(m, SEModule) for m in model.modules())
    assert any(isinstance(m, SEModule) for m in build_model("se_densenet_bc100", 3, block_config=(2, 2)).modules())


def test_memory_efficient_equals_plain_outputs_gradients_and_bn_statistics():
    torch.manual_seed(0)
    plain = build_model("se_densenet_bc100", num_classes=5, block_config=(3, 3), drop_rate=0.0).train()
    efficient = copy.deepcopy(plain)
    efficient.set_memory_efficient(True)
    x = torch.randn(4, 3, 16, 16)
    for _ in range(2):  # two steps: BN statistics must move once per step, not twice
        out_p, out_e = plain(x), efficient(x)
        torch.testing.assert_close(out_p, out_e)
        out_p.square().sum().backward()
        out_e.square().sum().backward()
    for (name, p), (_, e) in zip(plain.named_parameters(), efficient.named_parameters()):
        torch.testing.assert_close(p.grad, e.grad, msg=f"gradient of {name}")
    for (name, p), (_, e) in zip(plain.named_buffers(), efficient.named_buffers()):
        torch.testing.assert_close(p, e, msg=f"buffer {name}")
    assert int(efficient.features.denseblock1.denselayer1.norm1.num_batches_tracked) == 2


def test_memory_efficient_flag_from_builder():
    model = build_model("se_densenet_bc100", 3, memory_efficient=True)
    layer = model.features.denseblock1.denselayer1
    assert layer.memory_efficient


def test_heads_and_fine_tuning_verbs():
    model = build_model("se_densenet_bc100", 3, block_config=(2, 2))
    feats = model.forward_features(torch.randn(2, 3, 16, 16))
    assert model.forward_head(feats).shape == (2, 3)
    model.reset_classifier(11)
    assert model(torch.randn(1, 3, 16, 16)).shape == (1, 11)


@pytest.mark.parametrize(
    "kwargs", [dict(compression=0), dict(block_config=()), dict(se_reduction=-1), dict(drop_rate=1.5)]
)
def test_bad_constructor_arguments_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        SEDenseNet(**kwargs)


def test_unknown_arch_names_the_choices():
    with pytest.raises(ValueError, match="se_densenet121"):
        build_model("resnet50", 3)
    assert "se_densenet_bc100" in list_models()
