"""The second reliability audit: hostile photos and half-finished runs, one test per finding.

Each test failed on the code before its fix: thin images resized to gigabytes, a prediction whose final write
failed never finished, one explanation failing a whole batch of the service, journals of another command adopted,
inputs listed by every process, a weak INT8 model accepted, uploads joined quadratically and without a deadline,
a resumed time budget on a stale plan, transient read errors cached as verdicts, class names that are paths,
exports with the wrong permissions and stale files, malformed requests answered 500, remote checkpoints.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
from PIL import Image
from test_fault_injection import hostile_folder

from conftest import (
    COLOURS,
    PREDICT,
    TINY,
    best_checkpoint,
    make_folder,
    make_image,
    newest_run,
    predict_args,
    read_csv,
    run_cli,
    serving,
)
from sedense.data import images
from sedense.data.folders import scan_dataset
from sedense.errors import DataError, StorageError
from sedense.preprocessing import Preprocessing

THIN = {"wide 3000x1.png": (3000, 1), "tall 1x3000.png": (1, 3000), "strip 65535x1.png": (65535, 1)}


def write_thin(folder: Path) -> list[Path]:
    """The audit's thin strips: a few hundred bytes each, gigabytes once their short side is resized up."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, size in THIN.items():
        Image.new("RGB", size, COLOURS["metal"]).save(folder / name)
        paths.append(folder / name)
    return paths



# ----------------------------------------------------------------------------- 1. thin images
def test_a_thin_image_is_refused_before_any_pixel_is_resized(tmp_path):
    for path, (width, height) in zip(write_thin(tmp_path), THIN.values()):
        assert path.stat().st_size < 2000
        reason = images.check_image(path, "header", short_side=256)
        assert reason.startswith(f"{width}x{height} is too thin: {max(width, height)} times longer than wide"), reason
        assert images.check_image(path, "header") is None  # without a resize to do, the file itself is fine
        with pytest.raises(DataError, match="too thin"):
            images.load_image(path, short_side=256)
    photo = tmp_path / "photo.png"
    Image.new("RGB", (4000, 300)).save(photo)  # a panorama of 13:1 still resizes to 3413x256
    assert images.check_image(photo, "header", short_side=256) is None
    # A shape within the ratio, at a size whose resize would take more than the limit: 60:1 at 512 px.
    assert images.resize_reason(6000, 100, 512).startswith("6000x100 is too thin: resized to a short side of 512")


def test_predict_fit_and_test_list_thin_images_instead_of_resizing_them(trained_run, tmp_path):
    inbox = make_folder(tmp_path / "inbox", {"glass": 2, "metal": 2})
    thin = write_thin(inbox / "thin")
    run_cli(predict_args(best_checkpoint(trained_run), inbox, tmp_path / "runs"), tmp_path)
    run = newest_run(tmp_path / "runs")
    assert len(read_csv(run / "predictions.csv")) == 4
    errors = {r["path"]: r["reason"] for r in read_csv(run / "predict_errors.csv")}
    assert sorted(errors) == sorted(map(str, thin)) and all("too thin" in r for r in errors.values())

    data = make_folder(tmp_path / "data", {"cardboard": 6, "glass": 6})
    write_thin(data / "glass")
    run_cli(["fit", *TINY, "--data.root", data, "--trainer.max_epochs", "1", "--data.cache", "true",
             "--trainer.default_root_dir", tmp_path / "fit"], tmp_path)
    skipped = read_csv(newest_run(tmp_path / "fit") / "skipped_files.csv")
    assert sorted(Path(r["path"]).name for r in skipped) == sorted(THIN) and all("too thin" in r["reason"]
                                                                               for r in skipped)
    labelled = make_folder(tmp_path / "labelled", {"glass": 2, "metal": 2})
    write_thin(labelled / "metal")
    proc = run_cli(["test", "--ckpt_path", best_checkpoint(trained_run), "--data.test_root", labelled, *PREDICT,
                    "--trainer.default_root_dir", tmp_path / "test"], tmp_path)
    assert "Traceback" not in proc.stderr
    assert len(read_csv(newest_run(tmp_path / "test") / "skipped_files.csv")) == 3


# ----------------------------------------------------------------------------- 2. a final write that failed
def test_a_prediction_whose_final_write_failed_is_finished_by_the_rerun(trained_run, tmp_path, monkeypatch):
    from sedense.callbacks import prediction

    inbox = make_folder(tmp_path / "inbox", {"glass": 5, "metal": 5})
    args = predict_args(best_checkpoint(trained_run), inbox, tmp_path / "runs")
    real = prediction.write_file

    def full_disk(path, data):
        if str(path).endswith("predictions.csv"):
            raise StorageError(path, OSError(errno.ENOSPC, "No space left on device"))
        real(path, data)

    monkeypatch.setattr(prediction, "write_file", full_disk)
    failed = run_cli(args, tmp_path, check=False)
    assert failed.returncode == 1 and "No space left on device" in failed.stderr
    run = newest_run(tmp_path / "runs")
    assert not (run / "predictions.csv").exists() and len(list(run.glob("predictions.partial.*"))) == 1
    monkeypatch.undo()
    again = run_cli(args, tmp_path)
    assert "all 10 images were predicted before it stopped; writing the final files" in again.stdout
    assert newest_run(tmp_path / "runs") == run
    assert len(read_csv(run / "predictions.csv")) == 10
    assert len(json.loads((run / "predictions.json").read_text())) == 10
    assert json.loads((run / "predict_state.json").read_text())["complete"] is True
    assert not list(run.glob("predictions.partial.*"))


# ----------------------------------------------------------------------------- 4. journals of another command
def test_rows_of_another_command_or_of_a_replaced_photo_are_predicted_again(trained_run, tmp_path):
    inbox = make_folder(tmp_path / "inbox", {"glass": 4, "metal": 4})
    out = tmp_path / "fixed"  # no logger: every run writes into this one folder
    base = predict_args(best_checkpoint(trained_run), inbox, out, "--trainer.logger", "false",
                        "--data.batch_size", "4")
    stop = ["--trainer.callbacks+=inject.InterruptAfter", "--trainer.callbacks.batches=1"]
    assert run_cli([*base, "--predict_writer.top_k", "1", *stop], tmp_path, check=False).returncode == 130
    assert len((out / "predictions.partial.0.jsonl").read_text().splitlines()) == 4
    again = run_cli([*base, "--predict_writer.top_k", "2"], tmp_path)  # another command: nothing adopted
    assert "Continuing" not in again.stdout
    rows = read_csv(out / "predictions.csv")
    assert len(rows) == 8 and all(len(json.loads(r["top2"])) == 2 for r in rows)

    assert run_cli([*base, *stop], tmp_path, check=False).returncode == 130
    done = [json.loads(line)["path"] for line in (out / "predictions.partial.0.jsonl").read_text().splitlines()]
    replaced = Path(done[0])
    make_image(replaced, COLOURS["metal"], size=40, seed=99)  # another photo under the same name
    resumed = run_cli(base, tmp_path)
    assert "3 of 8 images were predicted before it stopped; predicting the other 5" in resumed.stdout
    fresh = run_cli(predict_args(best_checkpoint(trained_run), replaced, tmp_path / "fresh"), tmp_path)
    assert fresh.returncode == 0
    expected = read_csv(newest_run(tmp_path / "fresh") / "predictions.csv")[0]
    assert dict(expected.items()) == next(r for r in read_csv(out / "predictions.csv")
                                                       if r["path"] == str(replaced))


# ----------------------------------------------------------------------------- 5. one listing for every process
def test_prediction_inputs_are_listed_by_the_first_process_and_shared(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from sedense.data import datamodule

    inbox = make_folder(tmp_path / "inbox", {"glass": 3})
    first_process = ([inbox / "glass" / "glass_000.png"], [(inbox / "gone.png", "no such file")])
    listed = []
    monkeypatch.setattr(datamodule, "resolve_inputs", lambda spec: listed.append(spec) or ([], []))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    data = datamodule.ImageFolderDataModule(predict_root=str(inbox), num_workers=0)
    data.trainer = SimpleNamespace(world_size=2, is_global_zero=False, lightning_module=None,
                                   strategy=SimpleNamespace(broadcast=lambda obj: first_process))
    data.setup("predict")
    assert listed == []  # the second process reads no folder of its own
    assert (data.predict_files, data.predict_errors) == first_process


# ----------------------------------------------------------------------------- 6. INT8 of a model that is never sure
def test_an_int8_model_is_refused_on_its_overall_agreement_when_fp32_is_sure_of_nothing(trained_run, tmp_path,
                                                                                       monkeypatch):
    from sedense.deploy import quantize

    real = quantize.compare

    def never_sure(*args):  # fp32 sure of no image, and INT8 keeping the class of only half of them
        monkeypatch.setattr(quantize, "CONFIDENT", 1.01)
        return {**real(*args), "agreement": 0.5}

    monkeypatch.setattr(quantize, "compare", never_sure)
    refused = run_cli(["export", "--ckpt_path", "best", "--quantize", "int8", "--out", tmp_path / "int8"],
                      trained_run, check=False)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith(
        "sedense: error: the INT8 model changes the class of 50.0% of all 6 images (--min_overall_agreement 0.95)")
    assert "fp32 is sure of none of them, so only the agreement over all is checked" in refused.stdout
    assert list((tmp_path / "int8").iterdir()) == []


# ----------------------------------------------------------------------------- 7. upload bodies
def upload_middleware(body_timeout: float = 30.0):
    from sedense.deploy.http import ImageUploadMiddleware

    async def app(scope, receive, send):  # the model's side: never reached by these uploads
        raise AssertionError("a bad upload reached the model")

    return ImageUploadMiddleware(app, max_bytes=64 * 2**20, preprocessing=Preprocessing(image_size=16),
                                 body_timeout=body_timeout)


async def post(middleware, receive) -> tuple[int, dict]:
    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "path": "/predict", "method": "POST", "headers": [], "query_string": b""}
    await middleware(scope, receive, send)
    return sent[0]["status"], json.loads(b"".join(m.get("body", b"") for m in sent[1:]))


def test_a_trickled_upload_is_joined_once_and_a_stalled_one_answers_408():
    chunks = [b"x" * 100] * 100_000  # 10 MB in 100-byte pieces: joined piece by piece, ~500 GB of copies

    async def trickle():
        return {"type": "http.request", "body": chunks.pop(), "more_body": bool(chunks)}

    # A generous guard against a hang, not a speed test: the upload is joined in well under a second.
    status, answer = asyncio.run(asyncio.wait_for(post(upload_middleware(), trickle), 120))
    assert status == 400 and answer["error"].startswith("not a usable image")

    async def stall():
        if stall.first:
            stall.first = False
            return {"type": "http.request", "body": b"\x89PNG", "more_body": True}
        await asyncio.sleep(3600)

    stall.first = True
    status, answer = asyncio.run(asyncio.wait_for(post(upload_middleware(body_timeout=0.5), stall), 120))
    assert status == 408 and "longer than 0.5 s" in answer["error"]


# ----------------------------------------------------------------------------- 3, 1, 12: the service
def renamed_checkpoint(ckpt: Path, out: Path, names: list[str]) -> Path:
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"]["class_names"] = names
    torch.save(checkpoint, out)
    return out


def raw_request(url: str, head: bytes, body: bytes, wait: float) -> bytes:
    """Send a request's head and the start of its body, then nothing more for ``wait`` s; the answer's bytes."""
    address = urlparse(url)
    with socket.create_connection((address.hostname, address.port), timeout=30) as s:
        s.sendall(head + body)
        s.settimeout(wait + 30)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < int(
                answer.lower().split(b"content-length: ")[1].split(b"\r\n")[0]):
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
        return answer


HOSTILE_NAMES = ["card<!--<script>board", "glass", "metal"]


@pytest.fixture(scope="module")
def hostile_service(trained_run, tmp_path_factory):
    """One service for the tests of hostile requests (one xdist group: one worker starts it): class names that
    are markup, Grad-CAM "not installed" (the `serve` extra alone: a package of that name that cannot be
    imported), batches of 8 within 0.5 s, and 1 s for a request's body."""
    folder = tmp_path_factory.mktemp("hostile-service")
    fake = folder / "no-grad-cam" / "pytorch_grad_cam"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('simulated: grad-cam is not installed')\n")
    ckpt = renamed_checkpoint(best_checkpoint(trained_run), folder / "renamed.ckpt", HOSTILE_NAMES)
    with serving(trained_run, "--ckpt_path", ckpt, "--max_batch_size", "8", "--batch_timeout", "0.5",
                 "--body_timeout", "1", env={"PYTHONPATH": str(fake.parent)}) as url:
        yield url


@pytest.mark.xdist_group("processes")  # a service of several processes
def test_the_service_answers_each_request_alone(trained_run, hostile_service, tmp_path):
    import requests

    names, url = HOSTILE_NAMES, hostile_service
    photo = (sorted((trained_run / "data" / "glass").iterdir())[0]).read_bytes()
    thin = tmp_path / "thin"
    write_thin(thin)
    page = requests.get(url, timeout=30).text
    config_text = page.split('<script id="config" type="application/json">')[1].split("</script>")[0]
    assert "<" not in config_text  # no class name can close the element or open a comment in it
    config = json.loads(config_text)
    assert config["classes"] == names and config["explain"] is False  # the page hides its heat-map box

    def ask(explain: bool):
        return requests.post(f"{url}/predict" + ("?explain=1" if explain else ""), data=photo, timeout=60)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, [False, False, False, True, False, False, False, False]))
    explained = answers.pop(3)
    assert [a.status_code for a in answers] == [200] * 7 and {a.json()["class"] for a in answers} <= set(names)
    assert explained.status_code == 501 and "grad-cam" in explained.json()["error"].lower()

    for path in sorted(thin.iterdir()):
        refused = requests.post(f"{url}/predict", data=path.read_bytes(), timeout=60)
        assert refused.status_code == 400 and "too thin" in refused.json()["error"], refused.text
    no_boundary = requests.post(f"{url}/predict", data=b"--x\r\n", timeout=60,
                                headers={"content-type": "multipart/form-data"})
    assert no_boundary.status_code == 400 and "multipart" in no_boundary.json()["error"]
    nested = requests.post(f"{url}/predict", data=b"[" * 200_000 + b"]" * 200_000, timeout=60,
                           headers={"content-type": "application/json"})
    assert nested.status_code == 400 and "JSON uploads need" in nested.json()["error"]
    head = (f"POST /predict HTTP/1.1\r\nHost: {urlparse(url).netloc}\r\nContent-Type: image/png\r\n"
            "Content-Length: 100000\r\n\r\n").encode()
    stalled = raw_request(url, head, photo[:100], wait=1)
    assert stalled.startswith(b"HTTP/1.1 408") and b"longer than 1 s" in stalled
    assert ask(False).status_code == 200  # and the service still answers


@pytest.mark.xdist_group("processes")  # a service of several processes
def test_the_service_answers_every_hostile_upload_alone(hostile_service, tmp_path):
    import requests

    usable, unusable = hostile_folder(tmp_path / "hostile")  # the photos every entry point gets
    for path in usable + unusable:
        answer = requests.post(f"{hostile_service}/predict", data=path.read_bytes(), timeout=60)
        if path in usable:
            assert answer.status_code == 200 and "class" in answer.json(), (path.name, answer.text)
        else:
            assert answer.status_code == 400 and answer.json()["error"], (path.name, answer.text)
    assert requests.post(f"{hostile_service}/predict", data=usable[0].read_bytes(), timeout=60).status_code == 200


def test_the_page_escapes_its_config_and_reads_answers_that_are_not_json():
    from sedense.deploy.http import PageMiddleware

    page = PageMiddleware(None, {"classes": ["a</script><!--<script>", "b"]}).page
    text = page.split('<script id="config" type="application/json">')[1].split("</script>")[0]
    assert "<" not in text and json.loads(text)["classes"] == ["a</script><!--<script>", "b"]
    assert "URL.revokeObjectURL(shown)" in page and "response.text()" in page


# ----------------------------------------------------------------------------- 8. a resumed time budget
def test_a_resumed_plan_follows_the_options_in_force():
    from sedense.training.time_plan import TimePlan

    plan = TimePlan(10, 0, max_epochs=5, budget_seconds=60.0)
    for epoch in range(5):
        plan.replan(epoch + 1, (epoch + 1) * 10, 2.0, 60.0 - 2.0 * (epoch + 1))
    assert plan.planned_epochs == 5 and plan.progress(50) == 1.0  # finished at the old cap
    larger = TimePlan(**plan.state_dict())
    assert larger.resume(50, 5, 10, 20, 60.0, 10.0) == ["trainer.max_epochs 5 -> 20"]
    assert larger.progress(50) == pytest.approx(5 / 20) and larger.planned_epochs == 20  # the rate rises again
    assert larger.progress(200) == 1.0

    longer = TimePlan(**plan.state_dict())
    assert longer.resume(50, 5, 10, 5, 120.0, 60.0) == ["trainer.max_time 60 s -> 120 s"]
    assert longer.progress(50) == pytest.approx(0.5)  # not the whole extension at the floor

    batches = TimePlan(10, 0, budget_seconds=100.0)
    for epoch in range(2):
        batches.replan(epoch + 1, (epoch + 1) * 10, 10.0, 100.0 - 10.0 * (epoch + 1))
    before = batches.progress(20)
    assert batches.resume(20, 2, 5, None, 100.0, 20.0) == ["10 -> 5 steps an epoch"]  # a batch twice as large
    assert batches.progress(20) == pytest.approx(before) and batches.epoch_times == []
    planned = batches.replan(3, 25, 10.0, 70.0)
    assert batches.end_step == 20 + (planned - 2) * 5 and batches.progress(batches.end_step) == 1.0

    same = TimePlan(**plan.state_dict())
    assert same.resume(50, 5, 10, 5, 60.0, 10.0) == [] and same.state_dict() == plan.state_dict()


def test_a_longer_budget_after_a_finished_run_trains_the_extension_down_to_the_floor(tmp_path):
    import csv

    make_folder(tmp_path / "data", {"cardboard": 12, "glass": 12})
    budget = ["fit", *TINY, "--data.root", "data", "--model.schedule", "time", "--model.warmup_epochs", "1",
              "--model.lr", "0.002", "--model.lrf", "0.01"]
    run_cli([*budget, "--trainer.max_time", "00:00:00:05"], tmp_path)
    run = newest_run(tmp_path)
    with open(run / "results.csv", newline="") as f:
        first = len(list(csv.DictReader(f)))
    resumed = run_cli([*budget, "--trainer.max_time", "00:00:00:12", "--ckpt_path", "last"], tmp_path)
    assert "Time budget: resumed with trainer.max_time 5 s -> 12 s" in resumed.stdout
    with open(run / "results.csv", newline="") as f:
        rates = [float(r["lr"]) for r in csv.DictReader(f)][first:]
    floor = 0.002 * 0.01
    assert rates and rates[0] > 5 * floor and rates[-1] == pytest.approx(floor), rates


# ----------------------------------------------------------------------------- 9. the scan index
def test_the_scan_index_keeps_no_transient_failure_and_sees_a_replaced_file(tmp_path, monkeypatch):
    monkeypatch.setenv("SEDENSE_CACHE", str(tmp_path / "cache"))
    data = make_folder(tmp_path / "data", {"cardboard": 4, "glass": 4})
    locked = data / "glass" / "glass_001.png"
    real_open = images.Image.open

    def no_permission(path, *args, **kwargs):
        if Path(str(path)) == locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(images.Image, "open", no_permission)
    assert [p for p, _ in scan_dataset(data, 0.25, 0).skipped] == [locked]
    monkeypatch.setattr(images.Image, "open", real_open)  # permissions fixed
    assert scan_dataset(data, 0.25, 0).skipped == []

    victim = data / "cardboard" / "cardboard_002.png"
    before = victim.stat()
    copy = tmp_path / "replacement"
    copy.write_bytes(b"\0" * before.st_size)  # not an image, of the very same size
    os.utime(copy, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(copy, victim)  # as `rsync -a` or `cp -p` over it leave it: same size, same modification time
    assert (victim.stat().st_size, victim.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert [p for p, _ in scan_dataset(data, 0.25, 0).skipped] == [victim]


# ----------------------------------------------------------------------------- 10. class names that are paths
@pytest.mark.parametrize("name", ["../escaped", "/tmp/escaped", "..", "a\\b"])
def test_class_names_that_are_paths_are_refused_where_they_are_read(trained_run, tmp_path, name):
    ckpt = renamed_checkpoint(best_checkpoint(trained_run), tmp_path / "evil.ckpt", [name, "glass", "metal"])
    inbox = make_folder(tmp_path / "inbox", {"glass": 2})
    proc = run_cli(predict_args(ckpt, inbox, tmp_path / "runs", "--predict_writer.sort_into", tmp_path / "sorted"),
                   tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (f"sedense: error: model.class_names: the class name {name!r} is not a plain "
                                   "folder name (it is empty, . or .., or holds a path separator); rename the class, "
                                   "or give a model whose classes are folder names")
    assert not (tmp_path / "sorted").exists() and not (tmp_path / "escaped").exists()


def test_an_export_sidecar_with_a_path_for_a_class_is_refused(trained_run, tmp_path):
    out = tmp_path / "export"
    run_cli(["export", "--ckpt_path", "best", "--format", "torchscript", "--out", out], trained_run)
    (out / "class_indices.json").write_text(json.dumps({"0": "../up", "1": "glass", "2": "metal"}))
    proc = run_cli(predict_args(out / "model.pt", trained_run / "data" / "glass", tmp_path / "runs"), tmp_path,
                   check=False)
    assert proc.returncode == 2
    assert f"sedense: error: {out / 'class_indices.json'}: the class name '../up' is not a plain" in proc.stderr


# ----------------------------------------------------------------------------- 11. exported files
def test_exports_follow_the_umask_replace_stale_int8_files_and_clean_up_after_a_kill(trained_run, tmp_path):
    out = tmp_path / "export"
    old = os.umask(0o022)
    try:
        run_cli(["export", "--ckpt_path", "best", "--quantize", "int8", "--out", out], trained_run)
        files = ("model.onnx", "model.int8.onnx", "quantization.json", "class_indices.json", "preprocessing.json")
        assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == dict.fromkeys(files, 0o644)
        leftovers = [out / ".model.onnx.abc123.int8.sedense-tmp", out / ".model.int8.onnx.prep.sedense-tmp"]
        for path in leftovers:  # what a killed INT8 export left
            path.write_bytes(b"half a model")
        run_cli(["export", "--ckpt_path", "best", "--out", out], trained_run)
    finally:
        os.umask(old)
    # The INT8 files belonged to the model exported before: gone with it, as are the dead temporaries.
    assert sorted(p.name for p in out.iterdir()) == ["class_indices.json", "model.onnx", "preprocessing.json"]


# ----------------------------------------------------------------------------- 13. remote checkpoints
def test_a_remote_checkpoint_exports_and_serves_through_fsspec(trained_run, tmp_path):
    import fsspec

    from sedense.deploy.inference import InferenceModel

    fs = fsspec.filesystem("memory")
    fs.pipe("/remote/run/best.ckpt", best_checkpoint(trained_run).read_bytes())
    url = "memory://remote/run/best.ckpt"
    try:
        refused = run_cli(["export", "--ckpt_path", url], tmp_path, check=False)
        assert refused.returncode == 2 and refused.stderr.strip() == (
            f"sedense: error: --out: give a local folder for the export of {url} (the checkpoint is remote)")
        run_cli(["export", "--ckpt_path", url, "--format", "torchscript", "--out", tmp_path / "export"], tmp_path)
        assert (tmp_path / "export" / "model.pt").is_file()
        model = InferenceModel.from_file(url)
        assert model.class_names == ["cardboard", "glass", "metal"] and model.preprocessing.image_size == 16
        onnx = run_cli(["predict", "--ckpt_path", "memory://remote/run/model.onnx", "--data.predict_root",
                        trained_run / "data"], tmp_path, check=False)
        assert onnx.returncode == 2 and "no such file" in onnx.stderr
    finally:
        fs.rm("/remote", recursive=True)



def test_a_run_resumed_mid_epoch_times_its_steps_from_where_it_resumed(monkeypatch):
    from datetime import timedelta
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import Timer

    from sedense.callbacks import time_budget
    from sedense.training.time_plan import TimePlan

    clock = iter([0.0, 1.0, 1.0, 2.0, 2.0])  # epoch start; batch 5 ends at 1 s, batch 6 at 2 s
    monkeypatch.setattr(time_budget.time, "monotonic", lambda: next(clock))
    budget = time_budget.TimeBudget()
    budget.plan = TimePlan(10, 0, end_step=100)
    seen = []
    monkeypatch.setattr(budget.plan, "hold_to_clock", lambda step, left, per_step, end=None: seen.append(per_step))
    trainer = SimpleNamespace(callbacks=[Timer(duration=timedelta(seconds=600))], num_training_batches=10,
                              accumulate_grad_batches=1, global_step=15,
                              strategy=SimpleNamespace(broadcast=lambda x: x))
    budget.on_train_epoch_start(trainer, None)
    for batch_idx in (5, 6):  # resumed from a checkpoint saved after batch 4 of the epoch
        budget.on_train_batch_end(trainer, None, {"shape": (8, 3, 16, 16)}, None, batch_idx)
    # One second a step; counted from batch 0 it would be 1/6 and 2/7 s: the plan would think it had time to spare.
    assert seen[-1] == pytest.approx(1.0)
