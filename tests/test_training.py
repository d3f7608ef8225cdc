"""Training options for small, imbalanced data and speed, all from YAML."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch

from conftest import TINY, make_folder, run_cli
from sedense.data import ImageFolderDataModule
from sedense.data.transforms import batch_mixer
from sedense.deploy.inference import InferenceModel
from sedense.module import ImageClassifier
from sedense.preprocessing import Preprocessing

RECIPE = """
model:
  mixup_alpha: 0.2
  cutmix_alpha: 1.0
  mix_prob: 0.5
  ema_decay: 0.9
  channels_last: true
  label_smoothing: 0.1
  class_weights: balanced
data:
  cache: true
trainer:
  max_epochs: 5
  callbacks:
    - class_path: lightning.pytorch.callbacks.EarlyStopping
      init_args: {monitor: val_acc, mode: max, patience: 1, min_delta: 1.0}
"""


def test_mixup_cutmix_ema_cache_and_early_stopping_from_yaml(tmp_path):
    make_folder(tmp_path / "data", {"cardboard": 12, "glass": 6, "metal": 6})
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    run_cli(["fit", "--config", "recipe.yaml", *TINY, "--data.root", "data"], tmp_path)
    run = tmp_path / "lightning_logs" / "version_0"
    # min_delta 1.0 can never be met: the first epoch sets the best score, the second runs out of patience.
    assert list(json.loads((run / "metrics.json").read_text())) == ["epoch:0", "epoch:1"]
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert "current_model_state" in last  # EMA: the checkpoint's weights are the average ...
    averaged, current = last["state_dict"], last["current_model_state"]
    assert not torch.equal(averaged["net.classifier.weight"], current["net.classifier.weight"])  # ... not the live ones
    model = InferenceModel.from_file(run / "checkpoints" / "last.ckpt")
    assert torch.equal(model.net.classifier.weight, averaged["net.classifier.weight"])


def test_batch_mixer_mixes_images_and_labels():
    torch.manual_seed(0)
    x = torch.stack([torch.full((3, 8, 8), float(i)) for i in range(4)])
    y = torch.tensor([0, 1, 2, 0])
    mixed, soft = batch_mixer(0.4, 0.0, 3)(x, y)
    assert soft.shape == (4, 3) and torch.allclose(soft.sum(1), torch.ones(4))
    lam = soft[0, 0] if y[0] != y[-1] else None
    assert not torch.equal(mixed, x)
    assert lam is None or torch.allclose(mixed[0], lam * x[0] + (1 - lam) * x[-1], atol=1e-5)
    assert batch_mixer(0.0, 0.0, 3) is None


def test_batch_mixer_mixes_the_share_of_batches_it_is_given():
    torch.manual_seed(0)
    x = torch.stack([torch.full((3, 8, 8), float(i)) for i in range(4)])
    y = torch.tensor([0, 1, 2, 0])
    for prob, low, high in [(1.0, 200, 200), (0.25, 30, 72)]:
        mixer, mixed = batch_mixer(0.4, 0.0, 3, prob), 0
        for _ in range(200):
            images, labels = mixer(x, y)
            if labels.ndim == 2:  # soft labels: mixed, so the images are blends of neighbours
                mixed += 1
                assert labels.shape == (4, 3) and not torch.equal(images, x)
            else:  # left as it was, with its class indices
                assert torch.equal(images, x) and torch.equal(labels, y)
        assert low <= mixed <= high, (prob, mixed)


def test_cache_gives_the_same_validation_tensors_as_decoding(tmp_path):
    make_folder(tmp_path / "data", {"cardboard": 6, "glass": 6}, size=40)
    tensors = {}
    for cache in (False, True):
        pre = Preprocessing(16)
        data = ImageFolderDataModule(str(tmp_path / "data"), preprocessing=pre, num_workers=0, cache=cache)
        data.setup("fit")
        tensors[cache] = torch.stack([data.val_set[i][0] for i in range(len(data.val_set))])
        assert data.val_set.cache is (None if not cache else data.val_set.cache)
    assert torch.equal(tensors[False], tensors[True])


@pytest.mark.parametrize(
    "option, says",
    [("--model.mixup_alpha=-1", "model.mixup_alpha"), ("--model.ema_decay=1.5", "model.ema_decay"),
     ("--model.mix_prob=0", "model.mix_prob"), ("--data.verify=deep", "data.verify")],
)
def test_bad_training_options_name_the_option(tmp_path, option, says):
    make_folder(tmp_path / "data", {"cardboard": 4, "glass": 4})
    proc = run_cli(["fit", *TINY, "--data.root", "data", option], tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert says in proc.stderr


def test_compile_covers_training_steps_only_and_keeps_checkpoint_names(tmp_path, monkeypatch):
    import lightning.pytorch as pl

    make_folder(tmp_path / "data", {"cardboard": 10, "glass": 10})
    calls = {"train": 0, "eval": 0}
    real_compile = torch.compile

    def counting_compile(fn, **kwargs):  # dynamo's tracing without the slow C++ code generation
        compiled = real_compile(fn, backend="eager")

        def run(x):
            calls["train" if torch.is_grad_enabled() else "eval"] += 1
            return compiled(x)

        return run

    monkeypatch.setattr(torch, "compile", counting_compile)
    data = ImageFolderDataModule(str(tmp_path / "data"), preprocessing=Preprocessing(16), batch_size=4, num_workers=0)
    tiny = dict(class_names=["cardboard", "glass"], arch="se_densenet_bc100", block_config=[2, 2], growth_rate=8,
                num_init_features=8)
    model = ImageClassifier(**tiny, compile=True, ema_decay=0.9)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, data)
    assert calls == {"train": 2 * trainer.num_training_batches, "eval": 0}  # validation ran, but eager
    trainer.validate(model, data)
    assert calls["eval"] == 0
    keys = list(model.state_dict())
    assert keys == list(ImageClassifier(**tiny).state_dict())
    assert not any("_orig_mod" in k for k in keys)


def compiled_under_progressive_resizing(tmp_path, monkeypatch, image_size: int, start: float, epochs: int):
    """A tiny run compiled under progressive resizing; returns its warnings and, for each graph torch compiled,
    the shapes of its image inputs and whether any side was symbolic."""
    import lightning.pytorch as pl

    make_folder(tmp_path / "data", {"cardboard": 8, "glass": 8})
    graphs = []
    real_compile = torch.compile

    def recording_backend(gm, example_inputs):  # dynamo's graphs, without the slow C++ code generation
        graphs.append([tuple(i.shape) if isinstance(i, torch.Tensor) else type(i).__name__ for i in example_inputs])
        return gm.forward

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: real_compile(fn, backend=recording_backend, **kwargs))
    data = ImageFolderDataModule(str(tmp_path / "data"), preprocessing=Preprocessing(image_size), batch_size=4,
                                 num_workers=0)
    model = ImageClassifier(class_names=["cardboard", "glass"], arch="se_densenet_bc100", block_config=[2, 2],
                            growth_rate=8, num_init_features=8, compile=True, progressive_resize=start,
                            warmup_epochs=0)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    kept = getattr(config, limit)
    torch._dynamo.reset()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(model, data)
    finally:
        torch._dynamo.reset()
        setattr(config, limit, kept)  # the run raises it for this process; the other tests keep torch's
    images = [[s for s in shapes if isinstance(s, tuple) and len(s) == 4 and s[1] == 3 and s[-1] >= 16]
              for shapes in graphs]
    return [str(w.message) for w in caught], images, any(s == "SymInt" for shapes in graphs for s in shapes)


def test_under_progressive_resizing_each_size_compiles_a_static_graph_and_the_run_says_so(tmp_path, monkeypatch):
    # torch's default compiles the first size as it is and the next one with symbolic sides, which on a CPU
    # can take longer than a whole time budget inside one training step (the recipe's 64 -> 80 px: over 40 min).
    said, images, symbolic = compiled_under_progressive_resizing(tmp_path, monkeypatch, 32, 0.5, epochs=4)
    assert any(re.match(r"model.compile with model.progressive_resize 0.5: .* \(16 px, 32 px\)", w) for w in said)
    assert images == [[(4, 3, 16, 16)], [(4, 3, 32, 32)]] and not symbolic  # one graph for each size, its numbers


def test_more_sizes_than_torch_keeps_graphs_of_are_all_compiled(tmp_path, monkeypatch):
    # 10 sizes, 16 to 160 px: past torch's 8 graphs of a function, the last two would train uncompiled
    said, images, symbolic = compiled_under_progressive_resizing(tmp_path, monkeypatch, 160, 0.1, epochs=8)
    sizes = [16 * k for k in range(1, 11)]
    assert any(", ".join(f"{s} px" for s in sizes) in w for w in said)
    assert images == [[(4, 3, s, s)] for s in sizes] and not symbolic


def test_the_optimiser_is_the_fastest_implementation_this_torch_has_with_the_same_arithmetic(monkeypatch):
    from sedense.training import optimizers as module

    def groups(seed: int = 0) -> list[dict]:
        torch.manual_seed(seed)
        weights, bias = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(4))
        return [{"params": [weights], "weight_decay": 0.05}, {"params": [bias], "weight_decay": 0.0}]

    def trained(opt) -> list:
        params = [p for g in opt.param_groups for p in g["params"]]
        for step in range(5):
            for p in params:
                p.grad = torch.full_like(p, 0.1 * (step + 1)) - p.detach()
            opt.step()
        return [p.detach() for p in params]

    fast = module.make_optimizer("adamw", groups(), lr=0.01)
    assert fast.defaults["fused"]  # CPUs have fused AdamW from torch 2.4 on
    assert [g["weight_decay"] for g in fast.param_groups] == [0.05, 0.0]
    plain = module.make_optimizer("adamw", groups(), lr=0.01, implementations=({},))
    assert not plain.defaults.get("fused") and not plain.defaults.get("foreach")
    for a, b in zip(trained(fast), trained(plain)):
        torch.testing.assert_close(a, b)

    class WithoutFused(torch.optim.SGD):  # a torch, or a device, without a fused SGD
        def __init__(self, params, fused=None, **kwargs):
            if fused:
                raise RuntimeError("`fused=True` requires all the params to be Tensors of supported devices")
            super().__init__(params, **kwargs)

    monkeypatch.setitem(module.OPTIMIZERS, "sgd", WithoutFused)
    sgd = module.make_optimizer("sgd", groups(), lr=0.01, momentum=0.9)
    assert sgd.defaults["foreach"] and sgd.defaults["nesterov"]
    assert [len(g["params"]) for g in sgd.param_groups] == [1, 1]
    with pytest.raises(module.ConfigError, match="model.optimizer must be sgd, adam or adamw"):
        module.make_optimizer("lamb", groups(), lr=0.01)


def test_a_resumed_optimiser_keeps_the_implementation_this_run_chose():
    # A checkpoint's groups carry the implementation chosen where it was made; loaded as they were, a fused one
    # came back where this torch or device has none, or where mixed precision must clip gradients.
    from sedense.training import optimizers as module

    weights = torch.nn.Parameter(torch.ones(4, 3))
    fused = module.make_optimizer("adamw", [{"params": [weights]}], lr=0.01)
    weights.grad = torch.full_like(weights, 0.5)
    fused.step()
    saved = fused.state_dict()
    unfused = module.make_optimizer("adamw", [{"params": [weights]}], lr=0.01, implementations=({"foreach": True}, {}))
    unfused.load_state_dict(saved)
    assert saved["param_groups"][0]["fused"] and not unfused.param_groups[0]["fused"]  # the checkpoint unchanged
    assert unfused.param_groups[0]["foreach"] and unfused.param_groups[0]["lr"] == 0.01
    torch.testing.assert_close(unfused.state_dict()["state"][0]["exp_avg"], saved["state"][0]["exp_avg"])
    unfused.step()


def test_mixed_precision_clips_gradients_also_resuming_a_run_of_the_fused_optimiser(tmp_path):
    # Lightning's mixed precision refuses to clip the gradients of a fused optimiser, bf16 too: the run failed
    # in its first step with a traceback from inside Lightning
    make_folder(tmp_path / "data", {"cardboard": 8, "glass": 8})
    run_cli(["fit", *TINY, "--data.root", "data", "--trainer.max_epochs", "1"], tmp_path)  # fp32: fused
    run_cli(["fit", *TINY, "--data.root", "data", "--trainer.max_epochs", "2", "--ckpt_path", "last",
             "--trainer.precision", "bf16-mixed", "--trainer.gradient_clip_val", "1.0"], tmp_path)
    last = torch.load(tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["epoch"] == 1
    assert all(g["foreach"] and not g["fused"] for g in last["optimizer_states"][0]["param_groups"])
