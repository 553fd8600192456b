#!/usr/bin/env bash
# GPU readiness check: under 8 minutes on one GPU (each part has its own time limit).
#
#   bench/gpu_check.sh              # on cuda: the device-dependent tests, bench/speed.py, one
#                                   # paper-budget accuracy unit (RDED CIFAR-10 IPC 10, pretrained
#                                   # ResNet-20 teacher, KD protocol 300 epochs)
#   bench/gpu_check.sh --dry-run    # the same parts at tiny settings on the CPU (CI; ~1-2 min)
#
# Writes bench/results/gpu_check_cuda.json (dry run: gpu_check_dry.json); GPU_CHECK_OUT=DIR
# writes there instead. Every part is recorded with its exit code and seconds; the script exits
# non-zero when a part failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export OMP_WAIT_POLICY=PASSIVE PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
DATA=${NRRDD_SHARED_DATA:-../shared/data}
OUT=${GPU_CHECK_OUT:-bench/results}
mkdir -p "$OUT"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

if [ "${1:-}" = "--dry-run" ]; then
    MODE=dry DEVICE=cpu
    TESTS=(tests/test_gpu.py -k "rded or recompute")
    SPEED=(bench/speed.py --tiny --device cpu --methods rded --out "$OUT/speed_dry.json")
    DISTILL=(--dataset shapes --dataset-opt train_per_class=6 --dataset-opt test_per_class=2
             --ipc 1 --mipc 4 --images-per-step 4)
    EVAL=(--epochs 1 --student-width 8)
    LIMIT=240
else
    MODE=cuda DEVICE=cuda
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_check: CUDA is not available (use --dry-run on a CPU)" >&2
        exit 2
    fi
    TESTS=(tests/test_gpu.py tests/test_unroll.py)
    SPEED=(bench/speed.py --device cuda --out "$OUT/speed_cuda.json")
    DISTILL=(--dataset npz --data-root "$DATA" --train-file cifar10_train.npz
             --test-file cifar10_test.npz --ipc 10 --bf16 --channels-last
             --teacher "resnet20_cifar:$DATA/cifar10_resnet20_akamaster.th")
    EVAL=(--epochs 300)
    LIMIT=150
fi

PARTS="$WORK/parts.jsonl"
part() {  # part NAME LIMIT_S CMD...: run with a time limit, record exit code and seconds
    local name=$1 limit=$2
    shift 2
    local t0 rc
    t0=$(date +%s.%N)
    timeout "$limit" "$@" > "$WORK/$name.log" 2>&1
    rc=$?
    "$PY" - "$name" "$rc" "$t0" "$WORK/$name.log" >> "$PARTS" <<'EOF'
import json, sys, time
name, rc, t0, log = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
tail = open(log, errors="replace").read().strip().splitlines()[-5:]
print(json.dumps({"part": name, "rc": rc, "timed_out": rc == 124,
                  "seconds": round(time.time() - t0, 1), "tail": tail}))
EOF
    echo "gpu_check: $name rc=$rc" >&2
}

NRRDD_TEST_DEVICE=$DEVICE part tests "$LIMIT" "$PY" -m pytest -q -x -p no:cacheprovider "${TESTS[@]}"
part speed "$LIMIT" "$PY" "${SPEED[@]}"
part distill "$LIMIT" "$PY" -m nrrdd_core.cli distill --method rded "${DISTILL[@]}" \
    --device "$DEVICE" --out "$WORK/runs" --name rded_ipc10 --seed 0
part evaluate "$LIMIT" "$PY" -m nrrdd_core.cli evaluate "$WORK/runs/rded_ipc10" \
    --device "$DEVICE" "${EVAL[@]}"

"$PY" - "$MODE" "$DEVICE" "$PARTS" "$WORK/runs/rded_ipc10" "$OUT/gpu_check_$MODE.json" <<'EOF'
import json, pathlib, sys
import torch
mode, device, parts, run, out = sys.argv[1:]
doc = {"command": "bench/gpu_check.sh" + (" --dry-run" if mode == "dry" else ""), "device": device,
       "torch": torch.__version__,
       "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
       "parts": [json.loads(line) for line in open(parts)]}
evals = sorted((pathlib.Path(run) / "evals").glob("*.json"))
if evals:
    doc["accuracy_unit"] = {"method": "rded", "ipc": 10 if mode == "cuda" else 1,
                            "result": json.loads(evals[-1].read_text())}
doc["ok"] = all(p["rc"] == 0 for p in doc["parts"])
pathlib.Path(out).write_text(json.dumps(doc, indent=2, default=str))
print(f"gpu_check ({mode}): {'ok' if doc['ok'] else 'FAILED'} -> {out}")
sys.exit(0 if doc["ok"] else 1)
EOF
