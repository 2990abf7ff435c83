#!/usr/bin/env bash
# The GPU check: everything in this repository that only a CUDA machine can show, in one run of about 14 minutes
# on one GPU (each part has its own time limit; run the crossover part alone when a call is limited to 10 minutes). Run it from the repository root on the first GPU machine available:
#     bash tests/gpu_check.sh                 # everything (about 14 minutes: split it if a call is limited)
#     bash tests/gpu_check.sh unit train      # some parts: unit train resume compile decoders crossover benchmark
# Results under $OUT (default gpu_check_out/): the log (with the decoders' line), eval.json, crossover.txt,
# bench_cuda.json.
# Each step prints PASS or FAIL and the run goes on, so one failure does not hide the others.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/gpu-check-XXXX)
LOG="$OUT/gpu_check.log"
: > "$LOG"
FAILED=0
START=$(date +%s)

step() {  # step NAME SECONDS COMMAND...: run it with a time limit, log it, print PASS/FAIL
    local name=$1 limit=$2
    shift 2
    local begin=$(date +%s)
    echo "=== $name" | tee -a "$LOG"
    # in a fresh bash that knows this script's functions and arrays, so that timeout can run those too
    if timeout -k 10 "$limit" bash -c "$(declare -p COMMON TORCHRUN WORK OUT LOG CROSSOVER_BATCH); $(declare -f images_per_sec \
            sigterm_then_resume crossover decoders); \"\$@\"" step "$@" >> "$LOG" 2>&1; then
        echo "PASS $name ($(( $(date +%s) - begin ))s)" | tee -a "$LOG"
    else
        echo "FAIL $name (exit $?, $(( $(date +%s) - begin ))s; see $LOG)" | tee -a "$LOG"
        FAILED=$((FAILED + 1))
    fi
}

images_per_sec() {  # the last train/images_per_sec TensorBoard logged for a run folder
    python - "$1" <<'EOF'
import sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
events = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0})
events.Reload()
values = [e.value for e in events.Scalars("train/images_per_sec")]
print(f"{sum(values[1:]) / max(1, len(values) - 1):.0f}" if len(values) > 1 else "n/a")
EOF
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
python -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, \
'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name())" | tee -a "$LOG"
pip install -q -r requirements.txt >> "$LOG" 2>&1

# GPU_CHECK_DRY_RUN=1 tries the script's own mechanics on a CPU with tiny settings (8 steps an epoch either way)
if [ -n "${GPU_CHECK_DRY_RUN:-}" ]; then SIZE=(--arch small --img-size 32 -b 8 --device cpu --workers 1); COUNT=64
    CROSSOVER_BATCH=4
else SIZE=(--arch large --img-size 224 -b 128); COUNT=1024; CROSSOVER_BATCH=256; fi
COMMON=(--data-path "$WORK/data" "${SIZE[@]}" --width-mult 0.5 --amp --ema-decay 0.9999 --eval-every 100 --print-freq 4)
TORCHRUN=(python -m torch.distributed.run --nproc_per_node=1 --master_port=29600)

part_unit() {
    step "unit tests that need CUDA" 120 python -m pytest -q tests/test_gpu.py
}

part_train() {
    step "torchrun x1: fp16 + GradScaler + EMA + channels_last, 56 steps, CPU decoding" 120 \
        "${TORCHRUN[@]}" train.py "${COMMON[@]}" --epochs 7 --output-dir "$WORK/ckpt" --log-dir "$WORK/runs" \
        --run-name workers
    echo "images/s, fp16, CPU decoding: $(images_per_sec "$WORK/runs/workers")" | tee -a "$LOG"
    step "evaluate.py under torchrun x1" 60 \
        "${TORCHRUN[@]}" evaluate.py "$WORK/ckpt/best.pth" --data-path "$WORK/data" --json "$OUT/eval.json"
}

sigterm_then_resume() {  # SIGTERM just after the first epoch's end (inside the second), then --resume auto
    local args=("${COMMON[@]}" --epochs 6 --output-dir "$WORK/ckpt_resume" --log-dir "$WORK/runs" --run-name resume)
    "${TORCHRUN[@]}" train.py "${args[@]}" > "$WORK/resume.out" 2>&1 &
    local pid=$!
    for _ in $(seq 600); do grep -q "epoch 1/6: train loss" "$WORK/resume.out" && break; sleep 0.2; done
    sleep 1
    kill -TERM "$pid"
    wait "$pid"
    cat "$WORK/resume.out"
    python -c "
import torch
c = torch.load('$WORK/ckpt_resume/last.pth', weights_only=True)
print('stopped at epoch', c['epoch'], 'batch', c['batch_in_epoch'], 'step', c['step'], 'pending', c['validation_pending'])
assert c['step'] < 48" || return 1
    "${TORCHRUN[@]}" train.py "${args[@]}" --resume auto || return 1
    python -c "
import torch
c = torch.load('$WORK/ckpt_resume/last.pth', weights_only=True)
assert c['epoch'] == 6 and c['step'] == 48, (c['epoch'], c['step'])
print('resumed to the end: step', c['step'], 'scaler skips', c['scaler_skips'], 'non-finite', c['nonfinite_steps'])"
}

part_resume() {
    step "SIGTERM mid-run, then --resume auto" 150 sigterm_then_resume
}

part_compile() {
    step "torchrun x1: --compile (inductor), 24 steps" 180 \
        "${TORCHRUN[@]}" train.py "${COMMON[@]}" --epochs 3 --compile --output-dir "$WORK/ckpt_compile" \
        --log-dir "$WORK/runs" --run-name compile
    echo "images/s, compiled: $(images_per_sec "$WORK/runs/compile")" | tee -a "$LOG"
}

crossover() {  # the data pipeline (issue 16): CPU-decode workers against nvjpeg, original against pre-resized JPEGs
    python -m tools.resize_copy "$WORK/data" "$WORK/data320" --short-side 320 --workers 8 > "$WORK/resize.out" \
        2>&1 || { tail -5 "$WORK/resize.out"; return 1; }
    for run in data:workers:1 data:workers:2 data:workers:4 data:workers:8 data:workers:16 data:device:1 \
               data:device:4 data320:workers:1 data320:workers:4 data320:workers:16 data320:device:4; do
        local data=${run%%:*} rest=${run#*:}
        local decode=${rest%%:*} workers=${rest##*:}
        local name="${data}_${decode}_$workers"
        "${TORCHRUN[@]}" train.py "${COMMON[@]}" --data-path "$WORK/$data" -b "$CROSSOVER_BATCH" --epochs 5 --max-steps 16 \
            --workers "$workers" --decode-on "$decode" --output-dir "$WORK/ckpt_x" --log-dir "$WORK/runs_x" \
            --run-name "$name" > "$WORK/x.out" 2>&1 || { tail -5 "$WORK/x.out"; return 1; }
        echo "crossover: $data, decode on $decode, $workers workers: $(images_per_sec "$WORK/runs_x/$name") img/s"
        rm -rf "$WORK/ckpt_x"
    done | tee -a "$OUT/crossover.txt"
    return "${PIPESTATUS[0]}"
}

part_crossover() {
    step "data pipeline crossover under torchrun x1 (Large 0.5, batch 256, fp16: CPU workers 1/2/4/8/16 vs \
--decode-on device 1/4, original vs pre-resized 320 px)" 420 crossover
}

decoders() {  # --decode-on device: TorchCodec's batched nvjpeg against torchvision's, 256 JPEGs a call
    python - "$WORK/data" <<'EOF'
import sys, time, torch
import decode, layouts
index = layouts.find_dataset(sys.argv[1]).train
jpegs = [decode.read_image_file(index.path(i))[0] for i in range(min(256, len(index)))]
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the CPU in a dry run
sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
decoders = {"torchcodec": decode.decode_with_torchcodec, "torchvision": decode.decode_with_torchvision}
rates = {name: [] for name in decoders}
for round in range(6):
    for name, decoder in decoders.items():
        sync()
        start = time.perf_counter()
        decoder(device, jpegs)
        sync()
        if round:  # the first round warms both decoders up
            rates[name].append(len(jpegs) / (time.perf_counter() - start))
ratios = sorted(a / b for a, b in zip(rates["torchcodec"], rates["torchvision"]))
print(f"decoders: torchcodec {sorted(rates['torchcodec'])[2]:.0f} img/s, torchvision "
      f"{sorted(rates['torchvision'])[2]:.0f} img/s, torchcodec/torchvision {ratios[2]:.2f} "
      f"({ratios[0]:.2f}-{ratios[-1]:.2f})")
EOF
}

part_decoders() {
    step "nvjpeg through TorchCodec against torchvision (batched, 256 JPEGs a call)" 60 decoders
}

part_benchmark() {
    step "tools/benchmark.py --device cuda --quick" 180 python -m tools.benchmark --device cuda --quick --busy 0 \
        --index-files 0 --index-entries 0 --json "$OUT/bench_cuda.json"
}

# photo-like 500x375 JPEGs in 10 classes (train/ and val/ link the same files)
python -c "
from tools import benchmark
images = benchmark.generate_images('$WORK/src', count=$COUNT, classes=10)
benchmark.lay_out(images, '$WORK/data')" >> "$LOG" 2>&1

PARTS=${*:-unit train resume compile decoders crossover benchmark}
for part in $PARTS; do "part_$part"; done

echo "gpu_check: $FAILED failed, $(( $(date +%s) - START ))s; log in $LOG" | tee -a "$LOG"
rm -rf "$WORK"
exit $(( FAILED > 0 ))
