"""Using a trained model: batch prediction over messy folders, export, Grad-CAM and the HTTP service."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import subprocess
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import PREDICT, make_bad_corpus, make_image, newest_run, run_cli, serving
from sedense.preprocessing import Preprocessing


@pytest.fixture
def trained(trained_run) -> Path:
    return trained_run


@pytest.fixture(scope="session")
def onnx_export(trained_run) -> subprocess.CompletedProcess:
    """The tiny model exported to ONNX once (the exporter takes seconds): `sedense export`'s output."""
    return run_cli(["export", "--ckpt_path", "best", "--format", "onnx"], trained_run)


def predict(root: Path, spec: str, *extra: str, ckpt: str = "best") -> tuple[Path, subprocess.CompletedProcess]:
    proc = run_cli(["predict", "--ckpt_path", ckpt, "--data.predict_root", spec, *PREDICT, *extra], root)
    return newest_run(root), proc


def rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_predict_over_a_messy_folder_lists_every_bad_file_and_each_good_image_once(trained, tmp_path):
    corpus = make_bad_corpus(tmp_path / "inbox")
    nested = make_image(tmp_path / "inbox" / "deep" / "er" / "新しい photo.png", (200, 140, 60))
    run, proc = predict(trained, str(tmp_path / "inbox"))
    good = sorted(str(p) for p in corpus["good"] + [nested])
    assert [r["path"] for r in rows(run / "predictions.csv")] == good
    errors = {r["path"]: r["reason"] for r in rows(run / "predict_errors.csv")}
    assert set(errors) == {str(p) for p in corpus["bad"] + corpus["truncated"]}
    assert errors[str(corpus["truncated"][0])] == "cannot be decoded"
    assert "skipped 5 unreadable file(s)" in proc.stdout
    records = json.loads((run / "predictions.json").read_text(encoding="utf-8"))
    assert [r["path"] for r in records] == good
    for record, row in zip(records, rows(run / "predictions.csv")):
        assert record["class"] == row["class"] == record["top_k"][0]["class"]
        assert sum(t["probability"] for t in record["top_k"]) == pytest.approx(1.0, abs=1e-4)


def test_predict_takes_an_image_a_glob_or_a_list(trained, tmp_path):
    data = trained / "data"
    one, _ = predict(trained, str(data / "glass" / "glass_003.png"))
    assert [r["path"] for r in rows(one / "predictions.csv")] == [str(data / "glass" / "glass_003.png")]
    globbed, _ = predict(trained, str(data / "*" / "*_00[12].png"))
    assert len(rows(globbed / "predictions.csv")) == 6
    listing = tmp_path / "todo.txt"
    listing.write_text(f"# photos to sort\n{data / 'metal' / 'metal_000.png'}\nmissing.png\n", encoding="utf-8")
    listed, _ = predict(trained, str(listing))
    assert [r["path"] for r in rows(listed / "predictions.csv")] == [str(data / "metal" / "metal_000.png")]
    assert rows(listed / "predict_errors.csv") == [{"path": str(tmp_path / "missing.png"), "reason": "no such file"}]


def test_annotate_sort_threshold_tta_and_explain(trained, tmp_path):
    data = trained / "data"
    plain, _ = predict(trained, str(data))
    run, _ = predict(trained, str(data), "--predict_writer.annotate", "true", "--predict_writer.explain", "true",
                     "--predict_writer.sort_into", str(tmp_path / "sorted"), "--predict_writer.threshold", "0.5")
    predicted = rows(run / "predictions.csv")
    for r in predicted:  # the threshold marks the answers it accepts
        assert r.pop("accepted") == str(float(r["confidence"]) >= 0.5).lower()
    assert predicted == rows(plain / "predictions.csv")
    for r in predicted:
        rel = Path(r["path"]).relative_to(data)
        assert (run / "annotated" / rel).is_file() and (run / "explained" / rel.with_suffix(".png")).is_file()
        folder = r["class"] if float(r["confidence"]) >= 0.5 else "uncertain"
        assert (tmp_path / "sorted" / folder / rel).read_bytes() == Path(r["path"]).read_bytes()
    tta, _ = predict(trained, str(data), "--model.tta", "true")
    flipped = rows(tta / "predictions.csv")
    assert [r["path"] for r in flipped] == [r["path"] for r in predicted]
    assert any(a["confidence"] != b["confidence"] for a, b in zip(flipped, predicted))


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_matches_pytorch(trained, fmt, request):
    proc = (request.getfixturevalue("onnx_export") if fmt == "onnx"
            else run_cli(["export", "--ckpt_path", "best", "--format", fmt], trained))
    diff = float(proc.stdout.split("largest logit difference ")[1].split()[0])
    assert diff <= 1e-4 and "same classes: yes" in proc.stdout
    export = trained / "lightning_logs" / "version_0" / "export"
    assert json.loads((export / "class_indices.json").read_text()) == {"0": "cardboard", "1": "glass", "2": "metal"}
    assert Preprocessing.from_sidecar(export / "preprocessing.json").image_size == 16


def test_onnx_predictions_equal_pytorch(trained, onnx_export):
    torch_run, _ = predict(trained, "data")
    onnx_run, _ = predict(trained, "data", ckpt="lightning_logs/version_0/export/model.onnx")
    ours, theirs = rows(torch_run / "predictions.csv"), rows(onnx_run / "predictions.csv")
    assert [r["class"] for r in ours] == [r["class"] for r in theirs] and len(ours) == 24
    for a, b in zip(ours, theirs):
        assert float(a["confidence"]) == pytest.approx(float(b["confidence"]), abs=1e-4)


def onnx_outputs(model, names: list[str], images):
    """The tensors ``names`` of an ONNX ``model`` on ``images``, run by ONNX Runtime."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                              for n in names if n not in {o.name for o in probe.graph.output})
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(names, {"images": images})


def plain_densenet(path: Path) -> Path:
    """A tiny DenseNet without squeeze-and-excitation, its norms given uneven statistics, exported to ONNX."""
    import torch

    from sedense.deploy.export import export_onnx
    from sedense.models import SEDenseNet

    torch.manual_seed(0)
    net = SEDenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=3, se_reduction=0).eval()
    for norm in (m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        norm.running_var.uniform_(0.05, 4.0)
        norm.weight.data.uniform_(0.2, 3.0)
    export_onnx(net, torch.randn(2, 3, 16, 16), path)
    return path


def test_the_integer_graph_computes_what_the_exported_model_does(trained, onnx_export):
    import numpy as np
    import onnx

    from sedense.deploy.int8_graph import integer_graph

    exported = trained / "lightning_logs" / "version_0" / "export" / "model.onnx"
    model = onnx.load(str(exported))
    before = Counter(node.op_type for node in model.graph.node)
    rewritten = integer_graph(model)
    onnx.checker.check_model(rewritten)
    after = Counter(node.op_type for node in rewritten.graph.node)
    assert before["BatchNormalization"] > 0 and after["BatchNormalization"] == 0
    # 2 dense layers a block, 2 blocks: each layer's squeeze-and-excitation is pooled and convolved, not reshaped
    assert before["Unsqueeze"] == 4 and after["Unsqueeze"] == 0 and after["GlobalAveragePool"] == 4
    # each block's last concatenation takes the one before it and the new feature, not all the features again
    widths = [len(n.input) for n in rewritten.graph.node if n.op_type == "Concat"]
    assert widths == [2, 2, 2, 2] and before["Concat"] == 4
    # the transition's 1x1 convolution and 2x2 average pool are one 2x2 convolution of stride 2
    assert before["AveragePool"] == 1 and after["AveragePool"] == 0
    images = np.random.default_rng(0).normal(size=(5, 3, 16, 16)).astype(np.float32)
    logits = [onnx_outputs(m, ["logits"], images)[0] for m in (onnx.load(str(exported)), rewritten)]
    assert np.abs(logits[0] - logits[1]).max() < 1e-4 * max(1.0, np.abs(logits[0]).max())


@pytest.mark.parametrize("squeeze", [True, False], ids=["se_densenet", "plain_densenet"])
def test_equalized_features_share_one_range_and_the_model_computes_the_same(trained, onnx_export, tmp_path, squeeze):
    import numpy as np
    import onnx

    from sedense.deploy.int8_graph import equalize, integer_graph

    exported = (trained / "lightning_logs" / "version_0" / "export" / "model.onnx" if squeeze
                else plain_densenet(tmp_path / "plain.onnx"))
    model = integer_graph(onnx.load(str(exported)))
    images = np.random.default_rng(1).normal(size=(6, 3, 16, 16)).astype(np.float32)
    joined = [n.output[0] for n in model.graph.node if n.op_type == "Concat"]
    features = sorted({i for n in model.graph.node if n.op_type == "Concat" for i in n.input} - set(joined))
    spread = [np.abs(v).max(axis=(0, 2, 3)) for v in onnx_outputs(model, features, images)]
    assert max(s.max() / s.min() for s in spread) > 2  # the channels' ranges differ before
    before = onnx_outputs(model, ["logits"], images)[0]
    ranges = equalize(model, lambda m, names: [onnx_outputs(m, names, images)])
    onnx.checker.check_model(model)
    assert set(ranges) == set(features) | set(joined) and len(set(ranges.values())) == 2  # one range a block
    after = onnx_outputs(model, ["logits"], images)[0]
    assert np.abs(after - before).max() < 1e-4 * max(1.0, np.abs(before).max())
    for name, value in zip(ranges, onnx_outputs(model, list(ranges), images)):
        largest = np.abs(value).max(axis=(0, 2, 3))
        np.testing.assert_allclose(largest[largest > 1e-4 * ranges[name]], ranges[name], rtol=1e-4, err_msg=name)


def test_int8_export_is_checked_against_fp32_and_predicts(trained, tmp_path, monkeypatch):
    from sklearn.metrics import accuracy_score

    out = tmp_path / "int8"
    proc = run_cli(["export", "--ckpt_path", "best", "--quantize", "int8", "--out", out], trained)
    assert sorted(p.name for p in out.iterdir()) == ["class_indices.json", "model.int8.onnx", "model.onnx",
                                                     "preprocessing.json", "quantization.json"]
    import onnx

    ops = Counter(node.op_type for node in onnx.load(str(out / "model.int8.onnx")).graph.node)
    # Integer from the input to the final pooling: no float norm, activation or squeeze-and-excitation
    # between the integer operators, so no dequantize/quantize pair around each (there were 2 a layer).
    assert ops["QuantizeLinear"] == 2 and ops["DequantizeLinear"] == 2 and ops["QLinearConcat"] == 4
    assert not {"BatchNormalization", "Relu", "Sigmoid", "Gemm", "Mul", "Unsqueeze", "QLinearAveragePool"} & set(ops)
    # A block's features share their concatenations' scale and zero point, so the integer concatenation copies
    # them (where a stem's max pool makes a block's first feature, that one input keeps its input's scale).
    quantized = onnx.load(str(out / "model.int8.onnx")).graph
    constants = {i.name: onnx.numpy_helper.to_array(i).item() for i in quantized.initializer if i.dims == []}
    made_by = {o: n.op_type for n in quantized.node for o in n.output}
    copied, requantized = [], []
    for node in (n for n in quantized.node if n.op_type == "QLinearConcat"):
        shared = (constants[node.input[0]], constants[node.input[1]])
        for k in range(2, len(node.input), 3):
            same = (constants[node.input[k + 1]], constants[node.input[k + 2]]) == shared
            (copied if same else requantized).append(made_by[node.input[k]])
    assert len(copied) == 8 and requantized == []  # 4 concatenations of 2 inputs
    report = json.loads((out / "quantization.json").read_text())
    assert report["calibration_images"] == 18 and report["images"] == 6  # the run's own training / validation split
    # A tiny model may be sure of none of 6 images: then the agreement over all of them decides.
    assert report["confident_agreement"] is None or report["confident_agreement"] >= 0.99
    assert report["agreement"] >= 0.95 and "INT8 check on 6 labelled images" in proc.stdout
    split = {r["path"]: r["class"] for r in rows(trained / "lightning_logs" / "version_0" / "split.csv")
             if r["subset"] == "val"}
    answers = {}
    for name, key in (("model.onnx", "fp32_accuracy"), ("model.int8.onnx", "int8_accuracy")):
        run_cli(["predict", "--ckpt_path", out / name, "--data.predict_root", "data", *PREDICT,
                 "--trainer.default_root_dir", tmp_path / name], trained)
        run = newest_run(tmp_path / name)
        predicted = {r["path"]: r["class"] for r in rows(run / "predictions.csv")}
        val = sorted(split)
        assert report[key] == round(accuracy_score([split[p] for p in val], [predicted[p] for p in val]), 4)
        answers[name] = [predicted[p] for p in val]
    assert report["agreement"] == round(accuracy_score(answers["model.onnx"], answers["model.int8.onnx"]), 4)

    import requests

    photo = sorted(split)[0]
    with serving(trained, "--ckpt_path", out / "model.int8.onnx") as url:  # the service runs the INT8 model too
        answer = requests.post(f"{url}/predict?explain=1", data=(trained / photo).read_bytes(), timeout=60).json()
    assert answer["class"] == predicted[photo] and "exported model" in answer["heatmap_error"]

    from sedense.deploy import quantize

    real = quantize.compare  # an INT8 model that changes the class of 1 image in 10
    monkeypatch.setattr(quantize, "compare", lambda *args: {**real(*args), "confident_agreement": 0.9})
    refused = run_cli(["export", "--ckpt_path", "best", "--quantize", "int8", "--out", tmp_path / "refused"], trained,
                      check=False)
    assert refused.returncode != 0 and "nothing was written" in refused.stderr.strip().splitlines()[-1]
    assert list((tmp_path / "refused").iterdir()) == []  # nothing left behind
    bad = run_cli(["export", "--ckpt_path", "best", "--format", "torchscript", "--quantize", "int8"], trained,
                  check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "sedense: error: --quantize int8 needs --format onnx, not torchscript"


@pytest.fixture(scope="module")
def server(trained_run):
    """One service for this module's tests (they share an xdist group, so one worker starts it). A long batch
    timeout: a batch may wait that long for the requests that come with it, but a lone user's photo comes with none."""
    with serving(trained_run, "--ckpt_path", "best", "--max_upload_mb", "1", "--batch_timeout", "4",
                 "--max_batch_size", "8") as url:
        yield url


def broken_exif_jpeg(path: Path) -> Path:
    """A photo whose pixels decode but whose EXIF block does not: orientation 6 with an XResolution stored as text.

    It passes an image check; turning it upright (``exif_transpose``) fails.
    """
    import io
    import struct

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (24, 24), (40, 180, 60)).save(out, "JPEG")
    jpg = out.getvalue()
    entries = [struct.pack(">HHI", 0x0112, 3, 1) + struct.pack(">HH", 6, 0),  # Orientation: SHORT 6
               struct.pack(">HHI", 0x011A, 2, 4) + b"abc\0"]  # XResolution: ASCII instead of RATIONAL
    ifd = struct.pack(">H", len(entries)) + b"".join(entries) + struct.pack(">I", 0)
    app1 = b"Exif\x00\x00" + b"MM\x00\x2a" + struct.pack(">I", 8) + ifd
    path.write_bytes(jpg[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + jpg[2:])
    return path


@pytest.mark.xdist_group("service")
def test_service_answers_a_concurrent_burst_and_rejects_bad_uploads(trained, server, tmp_path):
    import requests

    from sedense.data.images import check_image

    files = sorted((trained / "data").rglob("*.png"))
    expected = {r["path"]: r for r in rows(predict(trained, "data")[0] / "predictions.csv")}
    broken = broken_exif_jpeg(tmp_path / "broken exif.jpg")
    assert check_image(broken, "full") is None  # its pixels decode: only turning it upright fails

    def post(path: Path):
        return requests.post(f"{server}/predict", data=path.read_bytes(), timeout=60)

    burst = files[:12] + [broken] + files[12:]  # sent together: batched with good uploads
    with ThreadPoolExecutor(13) as pool:
        answers = list(pool.map(post, burst))
    bad = answers.pop(12)
    assert bad.status_code == 400 and bad.json()["error"].startswith("not a usable image: cannot be decoded")
    assert [a.status_code for a in answers] == [200] * len(files)
    for path, answer in zip(files, answers):
        want = expected[str(path.relative_to(trained))]
        assert answer.json()["class"] == want["class"]
        assert answer.json()["confidence"] == pytest.approx(float(want["confidence"]), abs=1e-4)

    multipart = requests.post(f"{server}/predict", files={"file": files[0].open("rb")}, timeout=60)
    encoded = base64.b64encode(files[0].read_bytes()).decode()
    as_json = requests.post(f"{server}/predict", json={"image": encoded}, timeout=60)
    assert multipart.json() == as_json.json() == answers[0].json()

    for body, status in ((b"definitely not an image", 400), (b"", 400), (files[0].read_bytes()[:60], 400),
                         (b"\0" * (2 * 2**20), 413)):
        bad = requests.post(f"{server}/predict", data=body, timeout=60)
        assert bad.status_code == status and "error" in bad.json()
    assert requests.get(f"{server}/health", timeout=5).status_code == 200  # still up

    explained = requests.post(f"{server}/predict?explain=1", data=files[0].read_bytes(), timeout=60).json()
    assert {k: v for k, v in explained.items() if k != "heatmap"} == answers[0].json()
    assert "heatmap" not in answers[0].json()
    prefix = "data:image/png;base64,"
    assert explained["heatmap"].startswith(prefix)
    from PIL import Image

    heat = Image.open(io.BytesIO(base64.b64decode(explained["heatmap"][len(prefix):])))
    assert heat.size == (16, 16) and heat.mode == "RGB"  # the model's input (TINY: 16 px), coloured

    page = requests.get(f"{server}/", timeout=5)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '"classes": ["cardboard", "glass", "metal"]' in page.text
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page.text) and "@import" not in page.text  # offline


@pytest.mark.xdist_group("service")
def test_a_lone_request_is_not_kept_waiting_for_a_batch_to_fill(trained, server):
    import requests

    files = sorted((trained / "data").rglob("*.png"))

    def post(path: Path) -> tuple[float, dict]:  # the service's batch timeout is 4 s: a lone photo waited it all
        start = time.perf_counter()
        answer = requests.post(f"{server}/predict", data=path.read_bytes(), timeout=60)
        return time.perf_counter() - start, answer.json()

    lone = [post(path)[0] for path in files[:3]]
    with ThreadPoolExecutor(8) as pool:  # then 8 users at once: batched together, all answered
        burst = list(pool.map(post, files[3:11]))
    after = [post(path) for path in files[11:14]]
    assert max(lone) < 2.0, lone
    assert all("class" in answer for _, answer in burst + after)
    assert sorted(seconds for seconds, _ in after)[1] < 2.0  # alone again: no more waiting


@pytest.mark.parametrize("option", [["--top_k", "0"], ["--max_batch_size", "0"], ["--port", "70000"]])
def test_service_refuses_impossible_options_at_start_up(option, capsys):
    from sedense.commands import main

    with pytest.raises(SystemExit) as stop:
        main(["serve", "--ckpt_path", "never-read.ckpt", *option])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip() == f"sedense: error: {option[0]} must be " + {
        "--top_k": "at least 1, got 0", "--max_batch_size": "at least 1, got 0",
        "--port": "a port number from 1 to 65535, got 70000"}[option[0]]
