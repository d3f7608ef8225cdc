#!/usr/bin/env bash
# The checks of a lent GPU, in one call (see the device's limits): the GPU recipe (configs/trashnet_gpu.yaml, or
# CONFIG) on data.seed 1 and 2 side by side under its 4-minute budget, with the GPU's utilisation sampled every
# second; with OVERHEAD=1 first `sedense fit` against a bare PyTorch loop on the same data and model
# (bench_overhead.py). Everything lands as files under $OUT, the final checkpoints and splits too (to calibrate and
# compare them on a CPU afterwards: benchmarks/calibration_check.py).
#   bash benchmarks/gpu_check.sh DATA [OPTION ...]   (DATA: TrashNet's class folders; options go to `sedense fit`)
set -u
data=${1:?give the TrashNet folder}
config=${CONFIG:-configs/trashnet_gpu.yaml}
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
if [ -d .whl ]; then  # the packages the machine lacks, carried as wheels
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv > "$out/gpu.csv"
if [ "${OVERHEAD:-0}" = 1 ]; then
    (cd benchmarks && timeout 300 python3 bench_overhead.py --data "../$data" > "$out/overhead.json" 2> "$out/overhead.err")
    echo "overhead: $(tr -d '\n ' < "$out/overhead.json" | head -c 400)"
fi
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -l 1 > "$out/utilisation.csv" &
sampler=$!
pids=()
for seed in 1 2; do
    timeout 420 python3 -m sedense fit --config "$config" --data.root "$data" --data.seed "$seed" \
        --trainer.default_root_dir "/tmp/gpu-seed$seed" --trainer.enable_progress_bar false "${@:2}" \
        > "$out/fit$seed.log" 2>&1 &
    pids+=($!)
done
wait "${pids[@]}"
kill "$sampler"
python3 - "$out" <<'PY'
import csv, json, shutil, sys
from pathlib import Path
out, result = Path(sys.argv[1]), {}
for seed in (1, 2):
    run = max(Path(f"/tmp/gpu-seed{seed}/lightning_logs").glob("version_*"))
    history = json.loads((run / "metrics.json").read_text())
    last = history[max(history, key=lambda k: int(k.split(":")[1]))]["valid info"]
    rows = list(csv.DictReader(open(run / "results.csv")))
    seconds = float(rows[-1]["time"])
    result[f"seed{seed}"] = {"epochs": len(rows), "seconds": seconds, "last_lr": float(rows[-1]["lr"]),
                             "final_val_acc": last["accuracy"], "interval": last["intervals"]["accuracy"],
                             "mean_f1": last["mean f1 score"], "epoch_seconds": round(seconds / len(rows), 2),
                             "img_s": round(len(rows) * 1618 / seconds, 1)}
    calibration = run / "calibration.json"
    if calibration.exists():
        result[f"seed{seed}"]["calibration"] = json.loads(calibration.read_text())
    keep = out / f"seed{seed}"
    keep.mkdir(exist_ok=True)
    for name in ("split.csv", "results.csv", "metrics.json", "calibration.json", "risk_coverage.csv"):
        if (run / name).exists():
            shutil.copy(run / name, keep / name)
    shutil.copy(run / "checkpoints" / "last.ckpt", keep / "last.ckpt")
busy = [float(r[0]) for r in csv.reader(open(out / "utilisation.csv")) if r]
result["gpu_utilisation_mean"] = round(sum(busy) / max(len(busy), 1), 1)
(out / "recipe.json").write_text(json.dumps(result, indent=2))
print(json.dumps(result))
PY
