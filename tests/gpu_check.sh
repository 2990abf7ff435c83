#!/usr/bin/env bash
# The GPU check (issue 27): what only a CUDA machine can show, in one offline command of about 6 minutes on one
# H100: correctness first, then the images/s rows; the optional rows (the crossover, torch.compile) run only while
# the budget (GPU_CHECK_BUDGET, 360 s) leaves them the time they need.
#
# Prepare here, on a machine that reaches PyPI, in the repository root (.whl/ is ignored by git; about 10 MB):
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#         --platform manylinux2014_x86_64 -d .whl torch-ema==0.3 torchcodec==0.17.0
# Run there (the device tool), from a fresh copy of the repository with nothing fetched:
#     run  command: bash tests/gpu_check.sh    carry: [".whl"]    timeout_s: 420
# or on any CUDA machine with Python >= 3.10, torch, torchvision and the rest of requirements.txt:
#     bash tests/gpu_check.sh                      # everything, in this order:
#     bash tests/gpu_check.sh unit resume speed    # some parts: unit resume evaluate (after resume) decode speed
#
# The machine's own torch and torchvision are used as they are. pip runs once, with --no-index, on the wheels in
# .whl/ (GPU_CHECK_WHEELS) that are not installed already, into a folder put on PYTHONPATH; nothing reaches a
# network. TorchCodec 0.17's CUDA wheel (cu130, torch >= 2.11 through torch's stable ABI) decodes JPEGs with
# nvjpeg; where it does not import or decode on the GPU, the run says that it measured torchvision's nvjpeg only.
#
# Results under $OUT (default gpu_check_out/), 4 files: summary.txt (each step PASS/FAIL/SKIP with its seconds,
# each images/s row), results.json (the environment, the steps, every row with its windows), gpu_check.log
# (everything), eval.json (evaluate.py's). Each step has its own time limit; a failure is printed, with the end of
# its output, and the run goes on. Exit status: 0 when no step failed.
# GPU_CHECK_DRY_RUN=1 runs the same steps on the CPU at tiny sizes (tests/test_gpu_check.py: 45-70 s on 2 cores).
# What each step shows and why: docs/gpu-check.md.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/gpu-check-XXXX)
export GPU_CHECK_WORK=$WORK OUT
export XDG_CACHE_HOME=$WORK/cache  # layouts.py's listing cache
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1  # pip never looks for an index, whatever its config says
export PYTHONUNBUFFERED=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1  # tests/test_gpu.py needs no plugin
LOG=$OUT/gpu_check.log
SUMMARY=$OUT/summary.txt
: > "$LOG"
: > "$SUMMARY"
: > "$WORK/steps.tsv"
START=$(date +%s)
DRY=${GPU_CHECK_DRY_RUN:-}
BUDGET=${GPU_CHECK_BUDGET:-$([ -n "$DRY" ] && echo 240 || echo 360)}
export GPU_CHECK_DEADLINE=$(( START + BUDGET ))
FAILED=0

# Sizes. The GPU run: Large 0.5 at 224 px, fp16 + GradScaler, channels_last, EMA; ImageNet-sized (500x375) JPEGs.
# The dry run: Small 0.5 at 32 px on the CPU, one worker, a few dozen images: the same steps, in seconds.
if [ -n "$DRY" ]; then
    IMAGES=24; MIN_TRAIN=48; EPOCHS=3; IMG=32; BATCH=8
    TRAIN=(--arch small --workers 1 --device cpu)
    EVAL=(--workers 1 --device cpu)
    W_FULL=1; W_DEVICE=1; CROSSOVER="data:workers:2 data320:workers:1 data320:device:1"
else
    IMAGES=256; MIN_TRAIN=512; EPOCHS=3; IMG=224; BATCH=64  # 8 steps an epoch: slow enough to stop inside one
    TRAIN=(--arch large --workers 2)
    EVAL=(--workers 8)
    W_FULL=16; W_DEVICE=4
    CROSSOVER="data:workers:4 data:workers:8 data:device:1 data320:workers:4 data320:workers:16 data320:device:4"
fi
DATA=$WORK/data
TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc_per_node=1)  # a free port each

log() { echo "$*" | tee -a "$LOG"; }

record() {  # record STATUS NAME SECONDS [NOTE]: summary.txt, the console and results.json's steps
    local line="$1 $2 (${3}s${4:+; $4})"
    echo "$line" | tee -a "$LOG" >> "$SUMMARY"
    echo "$line"
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4:-}" >> "$WORK/steps.tsv"
}

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

step() {  # step NAME LIMIT COMMAND...: run it under its time limit, log its output, record PASS or FAIL
    local name=$1 limit=$2 begin=$(date +%s) status
    shift 2
    echo "=== $name (limit ${limit}s, $(left)s of the budget left)" | tee -a "$LOG"
    # in a fresh bash that knows this script's functions and arrays, so that timeout can run those too
    timeout -k 10 "$limit" bash -c "$(declare -p PY TRAIN EVAL TORCHRUN DATA EPOCHS IMG BATCH WORK OUT DRY); \
        $(declare -f helper resume interrupt_and_resume evaluate); \"\$@\"" step "$@" > "$WORK/step.out" 2>&1
    status=$?
    LAST_STATUS=$status
    cat "$WORK/step.out" >> "$LOG"
    grep -h "^ROW " "$WORK/step.out" | sed 's/^ROW /     /' | tee -a "$SUMMARY"
    if [ "$status" = 0 ]; then
        record PASS "$name" $(( $(date +%s) - begin ))
    else
        local why="exit $status"
        [ "$status" = 124 ] && why="over its ${limit}s limit"
        tail -n 15 "$WORK/step.out" | sed 's/^/    | /'
        record FAIL "$name" $(( $(date +%s) - begin )) "$why; see gpu_check.log"
        FAILED=$((FAILED + 1))
    fi
}

helper() { "$PY" "$WORK/helpers.py" "$@"; }

# ------------------------------------------------------------------------------------------------------------
# The Python parts, written to the work folder: the environment, the data, the checks and the timings. They
# import the repository's own modules; tools/benchmark.py's harness times the steps (its windows and medians).
cat > "$WORK/helpers.py" <<'EOF'
import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.getcwd())
DRY = bool(os.environ.get("GPU_CHECK_DRY_RUN"))
WORK = os.environ["GPU_CHECK_WORK"]
ROWS = os.path.join(WORK, "rows.jsonl")


def add_row(name, rates, **extra):
    """One images/s row: the median of its windows. Printed as ROW (summary.txt) and kept for results.json."""
    value = statistics.median(rates)
    with open(ROWS, "a") as f:
        f.write(json.dumps({"row": name, "images_per_s": round(value, 1), "windows": [round(r, 1) for r in rates],
                            **extra}) + "\n")
    print(f"ROW {name}: {value:,.0f} images/s (windows: {', '.join(f'{r:,.0f}' for r in rates)})", flush=True)


def device():
    import torch
    return torch.device("cuda" if torch.cuda.is_available() and not DRY else "cpu")


def env():
    """Versions, the GPU, and which JPEG decoder --decode-on device uses; fails at once without CUDA (not dry)."""
    import importlib.metadata
    import platform
    import torch
    import torchvision
    info = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(), "cpu_cores": os.cpu_count(),
            "dry_run": DRY}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    for dist in ("torch-ema", "torchcodec", "tensorboard", "onnxruntime", "psutil", "pytest"):
        try:
            info[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            info[dist] = None
    import decode
    import torch_ema  # noqa: F401  train.py's need: it must import
    info["torchcodec_imports"] = decode.torchcodec_decode_jpeg is not None
    try:  # a TorchCodec that imports but fails on the GPU is reported here, and again by the steps that use it
        info["device_jpeg_decoder"] = decode.device_jpeg_decoder(device())
    except Exception as error:
        info["device_jpeg_decoder"] = None
        info["device_jpeg_decoder_error"] = f"{type(error).__name__}: {error}"
    with open(os.path.join(WORK, "env.json"), "w") as f:
        json.dump(info, f, indent=1)
    for key, value in info.items():
        print(f"{key}: {value}")
    if info["device_jpeg_decoder"] != "TorchCodec":
        print(f"NOTE: TorchCodec does not decode on {device()} here: the --decode-on device rows measured "
              f"{'torchvision' if info['device_jpeg_decoder'] else 'no'} nvjpeg only")
    if not DRY and not torch.cuda.is_available():
        sys.exit("CUDA is not available: nothing else of this check can run")


def setup(root, count, min_train):
    env()
    data(root, count, min_train)


def data(root, count, min_train):
    """Photo-like 500x375 JPEGs in 10 classes, laid out as train/ and val/ (train/ links them over again)."""
    from tools import benchmark
    images = benchmark.generate_images(os.path.join(WORK, "src"), count=int(count), classes=10)
    benchmark.lay_out(images, root, min_train=int(min_train))
    print(f"{count} JPEGs (500x375) in {root}")


def load(path):
    import torch
    return torch.load(path, weights_only=True, map_location="cpu")


def resumed(path_stopped, path_a, path_b, total):
    """The checkpoint the SIGTERM left (saved after a finished step, inside the run), then the resumed run (b)
    against the run left alone (a): the same steps, loss scale and weights (bitwise where the algorithms are
    deterministic, else within test_faults.py's tolerance on the CPU)."""
    import torch
    total = int(total)
    c = load(path_stopped)
    print(f"stopped at epoch {c['epoch']}, batch {c['batch_in_epoch']}, step {c['step']} of {total}; validation "
          f"pending {c['validation_pending']}; loss scale {c['scaler'].get('scale')}")
    assert 0 < c["step"] < total, "the SIGTERM did not land inside the run"
    if c["batch_in_epoch"] == 0:
        print("note: it landed between two epochs, not inside one")
    a, b = load(path_a), load(path_b)
    assert a["step"] == b["step"] == total, (a["step"], b["step"], total)
    assert a["scaler"] == b["scaler"], (a["scaler"], b["scaler"])
    worst, unequal, count = 0.0, 0, 0
    for key in ("model", "ema_model"):
        for name, value in a[key].items():
            count += 1
            if not torch.equal(value, b[key][name]):
                unequal += 1
                if value.is_floating_point():
                    worst = max(worst, (value.double() - b[key][name].double()).abs().max().item())
    print(f"resumed run against the run left alone: {count - unequal} of {count} tensors bitwise equal, largest "
          f"difference {worst:.3g}; step {b['step']}, loss scale {b['scaler'].get('scale')}, GradScaler skips "
          f"{b['scaler_skips']}, non-finite steps {b['nonfinite_steps']}")
    for key in ("model", "ema_model"):
        for name, value in a[key].items():
            torch.testing.assert_close(b[key][name], value, rtol=1e-5, atol=1e-6, msg=f"{key}.{name}")


def evaluated(path, images):
    with open(path) as f:
        result = json.load(f)
    print(f"evaluate.py under torchrun: top-1 {result['top1']:.2f}% on {result['images']} images, loss "
          f"{result['loss']:.4f}, {result.get('images_per_sec', 0):,.0f} images/s")
    assert result["images"] == int(images) and result["loss"] == result["loss"], result


def decode_check(root, img_size, count):
    """--decode-on device's batch (EncodedImageFiles.batch_to) on the device against the same batch on the CPU,
    then each JPEG decoder that decodes on the device, timed on batches of 256 files, and one CPU core."""
    import torch
    import dataset
    import decode
    import layouts
    dev, cpu = device(), torch.device("cpu")
    index = layouts.find_dataset(root).train
    samples = dataset.EncodedImageFiles(index, int(img_size))
    batch, labels = samples.collate([samples[(i, 1000 + i)] for i in range(min(int(count), len(index)))])
    on_cpu, _ = samples.batch_to(cpu, batch, labels)
    on_device, device_labels = samples.batch_to(dev, batch, labels)
    diff = (on_device.cpu().int() - on_cpu.int()).abs().float()
    name = decode.device_jpeg_decoder(dev)
    print(f"--decode-on device ({name} on {dev}) against the CPU path, {len(labels)} images at {img_size} px: "
          f"mean difference {diff.mean():.3f}, largest {diff.max():.0f} grey levels")
    assert torch.equal(device_labels.cpu(), labels) and diff.mean() < 2
    jpegs = [decode.read_image_file(index.path(i))[0] for i in range(min(256, len(index)))]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    decoders = {"TorchCodec": decode.decode_with_torchcodec, "torchvision": decode.decode_with_torchvision}
    decoders = {k: v for k, v in decoders.items() if (decode.torchcodec_decode_jpeg if k == "TorchCodec"
                                                      else decode.decode_jpeg) is not None}
    rates = {k: [] for k in decoders}
    for round_ in range(2 if DRY else 6):
        for key, decoder in decoders.items():
            sync()
            start = time.perf_counter()
            decoder(dev, jpegs)
            sync()
            if round_:  # the first round warms each decoder up
                rates[key].append(len(jpegs) / (time.perf_counter() - start))
    for key, values in rates.items():
        add_row(f"JPEG decoding, {key} on {dev}, batches of {len(jpegs)} (500x375)", values)
    torch.set_num_threads(1)
    start, few = time.perf_counter(), jpegs[:32]
    for data in few:
        decode.decode_jpeg_cpu(data)
    add_row("JPEG decoding on 1 CPU core (libjpeg-turbo, 500x375)", [len(few) / (time.perf_counter() - start)])


def speed_settings():
    """tools/benchmark.py's settings: Large 0.5, batch 256 at 224 px, 3 windows of 1.5 s (tiny in the dry run)."""
    return argparse.Namespace(arch="small" if DRY else "large", width_mult=0.5, batch_size=8 if DRY else 256,
                              img_size=32 if DRY else 224, device=device(), windows=1 if DRY else 3,
                              window_seconds=0.2 if DRY else 1.5, steps=None, threads=None)


class Limit:
    """A time limit of its own for one row: the next row still runs after one that hangs or fails."""

    def __init__(self, seconds):
        self.seconds = seconds

    def __enter__(self):
        def expire(signum, frame):
            raise TimeoutError(f"over its {self.seconds}s limit")
        signal.signal(signal.SIGALRM, expire)
        signal.alarm(self.seconds)

    def __exit__(self, *exc_info):
        signal.alarm(0)


def model_row(compile_=False):
    """train.py's update step (train.train_step: autocast + GradScaler, fused Adam, EMA) on a synthetic batch
    already on the device: the model's own ceiling."""
    import torch
    from tools import benchmark as bm
    settings = speed_settings()
    torch.backends.cudnn.benchmark = True  # as train.py sets it
    if compile_ and DRY:  # inductor takes minutes on a CPU: the dry run tries the mechanics with eager
        import functools
        torch.compile = functools.partial(torch.compile, backend="eager")
    config = bm.train_config(settings, *(["--compile"] if compile_ else []))
    trainer = bm.make_trainer(config, settings.device)
    described = (f"{settings.arch.capitalize()} {settings.width_mult:g}, {trainer.precision}, channels_last "
                 f"{config.channels_last}, EMA, batch {settings.batch_size} at {settings.img_size} px")
    if not DRY:
        assert "fp16" in trainer.precision and config.channels_last, described
    variant = bm.model_only(f"model-only step{', torch.compile' if compile_ else ''} ({described}), synthetic "
                            f"data on {settings.device}", trainer, settings)
    start = time.perf_counter()
    rates = bm.compare([variant], settings)[variant.name]
    add_row(variant.name, rates, seconds=round(time.perf_counter() - start, 1))


def pipeline_row(spec):
    """train.py's own loop (train.train_one_epoch on a train.build_run) from the JPEG files. spec:
    DATA:DECODE_ON:WORKERS, DATA a folder of the work folder (data: 500x375, data320: pre-resized)."""
    import torch
    from tools import benchmark as bm
    settings = speed_settings()
    folder, decode_on, workers = spec.split(":")
    what = {"data": "500x375 JPEGs", "data320": "JPEGs pre-resized to 320 px"}[folder]
    where = "decoded by the CPU workers" if decode_on == "workers" else "decoded on the device"
    pipeline, start = None, time.perf_counter()
    try:
        pipeline = bm.Pipeline(settings, os.path.join(WORK, folder), tempfile.mkdtemp(dir=WORK), int(workers),
                               decode_on)
        run = pipeline.base_run
        name = (f"full pipeline, {what} {where}, {workers} loader workers ({settings.arch.capitalize()} "
                f"{settings.width_mult:g}, {run.precision}, channels_last {run.config.channels_last}, batch "
                f"{settings.batch_size} at {settings.img_size} px)")
        variant = bm.Variant(name, pipeline.run, settings.batch_size, settle=bm.wait_until_idle, whole_windows=True)
        add_row(name, bm.compare([variant], settings)[name], workers=int(workers), decode_on=decode_on, data=folder,
                seconds=round(time.perf_counter() - start, 1))
    finally:
        if pipeline is not None:
            pipeline.close()
        torch.cuda.empty_cache()


def resized_copy():
    from tools.resize_copy import make_resized_copy
    print(make_resized_copy(os.path.join(WORK, "data"), os.path.join(WORK, "data320"), short_side=320))


def speed(full_workers, device_workers, crossover):
    """Every images/s row, in this one process (one CUDA start): each row under a time limit of its own, a failed
    one printed and the next one run; the optional rows (the crossover, torch.compile) only while the budget
    (GPU_CHECK_DEADLINE) leaves them the time they need."""
    import traceback
    deadline, failed = float(os.environ["GPU_CHECK_DEADLINE"]), 0
    rows = [("the model's ceiling", 0, 120, model_row, ()),
            (f"full pipeline, {full_workers} CPU workers", 0, 90, pipeline_row, (f"data:workers:{full_workers}",)),
            ("full pipeline, --decode-on device", 0, 90, pipeline_row, (f"data:device:{device_workers}",)),
            ("pre-resized copy for the crossover", 60, 60, resized_copy, ())]
    rows += [(f"crossover {spec}", 30, 60, pipeline_row, (spec,)) for spec in crossover.split()]
    rows += [("the model's ceiling with torch.compile", 120, 240, model_row, (True,))]
    for name, needs, limit, function, args in rows:
        left = deadline - time.time()
        if needs and left < needs:
            print(f"ROW SKIP {name}: needs {needs}s, {left:.0f}s of the budget left", flush=True)
            continue
        cut = needs and left < limit  # an optional row stopped by the budget's end is skipped, not failed
        start = time.perf_counter()
        try:
            with Limit(int(left if cut else limit)):
                function(*args)
        except TimeoutError if cut else () as error:
            print(f"ROW SKIP {name}: stopped at the budget's end, after {time.perf_counter() - start:.0f}s ({error})",
                  flush=True)
        except Exception as error:  # the next row still runs
            traceback.print_exc(file=sys.stdout)
            print(f"ROW FAIL {name}: {type(error).__name__}: {error}", flush=True)
            failed += 1
    sys.exit(1 if failed else 0)


def finish(wall, budget):
    """results.json: the environment, the steps and the rows."""
    def read(name, parse):
        path = os.path.join(WORK, name)
        return parse(open(path)) if os.path.exists(path) else None
    steps = [dict(zip(("status", "name", "seconds", "note"), line.rstrip("\n").split("\t")))
             for line in open(os.path.join(WORK, "steps.tsv"))]
    results = {"environment": read("env.json", json.load), "wall_seconds": int(wall), "budget_seconds": int(budget),
               "steps": steps, "rows": read("rows.jsonl", lambda f: [json.loads(line) for line in f]) or []}
    with open(os.path.join(os.environ["OUT"], "results.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    globals()[sys.argv[1]](*sys.argv[2:])
EOF

# ------------------------------------------------------------------------------------------------------------
# SIGTERM in the middle of a torchrun x1 training run (fp16 + GradScaler, EMA, channels_last, deterministic
# algorithms), then --resume auto; the result is compared with the same run left alone, trained beside it.
resume() {
    export CUBLAS_WORKSPACE_CONFIG=:4096:8  # deterministic cuBLAS
    local args=("${TRAIN[@]}" --img-size "$IMG" -b "$BATCH" --data-path "$DATA" --width-mult 0.5 --amp
                --amp-dtype float16 --channels-last --ema-decay 0.99 --deterministic --epochs "$EPOCHS"
                --eval-every 100 --print-freq 1 --log-dir "$WORK/runs")
    local steps=$(( $(find "$DATA/train" -name '*.JPEG' | wc -l) / BATCH * EPOCHS ))
    "${TORCHRUN[@]}" train.py "${args[@]}" --output-dir "$WORK/a" --run-name a > "$WORK/a.out" 2>&1 &
    local alone=$! status
    interrupt_and_resume
    status=$?
    [ "$status" = 0 ] || kill -TERM "$alone" 2> /dev/null
    wait "$alone" || status=1
    echo "--- the run left alone"; cat "$WORK/a.out"
    [ "$status" = 0 ] && helper resumed "$WORK/stopped.pth" "$WORK/a/last.pth" "$WORK/b/last.pth" "$steps"
}

interrupt_and_resume() {  # resume's run b: SIGTERM to torchrun once its second epoch has made a step, then resumed
    "${TORCHRUN[@]}" train.py "${args[@]}" --output-dir "$WORK/b" --run-name b > "$WORK/b.out" 2>&1 &
    local stopped=$!
    for _ in $(seq 1200); do
        grep -qE "epoch 2/$EPOCHS: +[0-9]+%\|[^|]*\| *[1-9]" "$WORK/b.out" && break
        kill -0 "$stopped" 2> /dev/null || break
        sleep 0.1
    done
    kill -TERM "$stopped"
    wait "$stopped"  # torchrun's own exit status after a SIGTERM is not this repository's
    echo "--- the interrupted run"; cat "$WORK/b.out"
    grep -q "precision fp16 + GradScaler | channels_last True" "$WORK/b.out" || { echo "not fp16 + channels_last"
                                                                                     return 1; }
    grep -q "SIGTERM received" "$WORK/b.out" || { echo "no 'SIGTERM received' from train.py"; return 1; }
    cp "$WORK/b/last.pth" "$WORK/stopped.pth" || return 1
    "${TORCHRUN[@]}" train.py "${args[@]}" --output-dir "$WORK/b" --run-name b --resume auto > "$WORK/b2.out" 2>&1
    local status=$?
    echo "--- the resumed run"; cat "$WORK/b2.out"
    return "$status"
}

evaluate() {  # the uninterrupted run's best.pth (resume's), scored by evaluate.py under torchrun
    "${TORCHRUN[@]}" evaluate.py "$WORK/a/best.pth" --data-path "$DATA" "${EVAL[@]}" --json "$OUT/eval.json" \
        || return 1
    helper evaluated "$OUT/eval.json" "$(find "$DATA/val" -name '*.JPEG' | wc -l)"
}

# ------------------------------------------------------------------------------------------------------------
log "gpu_check: $(date -u +%FT%TZ), ${DRY:+dry run, }budget ${BUDGET}s, python $PY"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
    2>&1 | tee -a "$LOG"

# The wheels brought along: each one not installed already (the same version), installed without an index.
WHEELS=${GPU_CHECK_WHEELS:-.whl}
begin=$(date +%s)
missing=()
for wheel in "$WHEELS"/*.whl; do
    [ -e "$wheel" ] || continue
    IFS=- read -r dist version _ <<< "$(basename "$wheel")"
    if [ "$("$PY" -c "import importlib.metadata as m; print(m.version('$dist'))" 2> /dev/null)" = "$version" ]; then
        log "$dist $version: installed already"
    else
        missing+=("$wheel")
    fi
done
if [ ${#missing[@]} = 0 ]; then
    record PASS "wheels: none to install from ${WHEELS}/" 0
elif timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$WORK/site" "${missing[@]}" >> "$LOG" 2>&1; then
    export PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}
    installed=()
    for wheel in "${missing[@]}"; do  # each one now seen at its version, through PYTHONPATH
        IFS=- read -r dist version _ <<< "$(basename "$wheel")"
        seen=$("$PY" -c "import importlib.metadata as m; print(m.version('$dist'))" 2>&1)
        log "$dist $version: installed from $(basename "$wheel"); seen: $seen"
        [ "$seen" = "$version" ] && installed+=("$dist $version")
    done
    if [ ${#installed[@]} = ${#missing[@]} ]; then
        record PASS "wheels: installed $(IFS=,; echo "${installed[*]}" | sed 's/,/, /g') from ${WHEELS}/" \
            $(( $(date +%s) - begin ))
    else
        record FAIL "wheels: installed from ${WHEELS}/ but not all seen" $(( $(date +%s) - begin )) "see gpu_check.log"
        FAILED=$((FAILED + 1))
    fi
else
    record FAIL "wheels: pip install --no-index ${missing[*]}" $(( $(date +%s) - begin )) "see gpu_check.log"
    FAILED=$((FAILED + 1))
fi

step "environment and data: versions, GPU, JPEG decoder; $IMAGES photo-like 500x375 JPEGs" 120 \
    helper setup "$DATA" "$IMAGES" "$MIN_TRAIN"
if [ "$LAST_STATUS" != 0 ] && [ -z "$DRY" ]; then  # no CUDA, or a package that train.py needs does not import
    log "gpu_check: stopped early: the environment is not usable"
    echo "gpu_check: stopped early: the environment is not usable" >> "$SUMMARY"
    helper finish $(( $(date +%s) - START )) "$BUDGET"
    rm -rf "$WORK"
    exit 1
fi

PARTS=${*:-unit resume evaluate decode speed}
for part in $PARTS; do
    case $part in
    unit) step "unit tests that need CUDA (tests/test_gpu.py)" 150 \
              "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py ;;
    resume) step "torchrun x1 fp16 + GradScaler + EMA + channels_last: SIGTERM mid-run, --resume auto equals \
the run left alone" 180 resume ;;
    evaluate) step "evaluate.py under torchrun x1" 90 evaluate ;;
    decode|decoders) step "--decode-on device: pixels against the CPU path; the decoders timed" 90 \
                helper decode_check "$DATA" "$IMG" 64 ;;
    speed) limit=$(left); [ "$limit" -lt 240 ] && limit=240  # the optional rows stop at the budget's end
           step "speed: images/s rows (the crossover and torch.compile while the budget lasts)" "$limit" \
               helper speed "$W_FULL" "$W_DEVICE" "$CROSSOVER" ;;
    *) record FAIL "unknown part '$part'" 0 "parts: unit resume evaluate decode speed"
       FAILED=$((FAILED + 1)) ;;
    esac
done

WALL=$(( $(date +%s) - START ))
helper finish "$WALL" "$BUDGET"
log "gpu_check: $FAILED failed, ${WALL}s (budget ${BUDGET}s); results in $OUT/"
echo "gpu_check: $FAILED failed, ${WALL}s" >> "$SUMMARY"
rm -rf "$WORK"
exit $(( FAILED > 0 ))
