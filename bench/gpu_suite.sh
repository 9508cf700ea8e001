#!/usr/bin/env bash
# hamengine GPU suite: one script for a CUDA host (x86-64, PyTorch already installed, no package index).
#
#   bash bench/gpu_suite.sh [OUT]          # results in OUT (default ./gpu-results)
#   bash bench/gpu_suite.sh --dry-run [OUT] # every step on the CPU with tiny sizes (~minutes): checks
#                                           # the script itself (options, paths, summary) before a GPU run;
#                                           # installs nothing (the PYTHONPATH shim stands in for pip -e)
#
# Steps (each one timed and bounded; a failing step is recorded in OUT/status.tsv and the rest goes on):
#   1. environment record (nvidia-smi, torch, CUDA)           -> OUT/env.txt
#   2. DALI, when it is not importable: OFFLINE_WHEELS=PARTS (the folder of part-NN + SHA256 that
#      `offline-wheels.sh prepare` makes: DALI with optree, makefun, nvtx, nvImageCodec, nvCOMP) is
#      installed with that script into WORK/site and put on PYTHONPATH. (DALI_WHEEL, the DALI wheel
#      alone with --no-deps, is a last resort: DALI 2.4 then fails to import its dependencies.)
#      Either way the install is checked by building a DALI pipeline (step dali_check).
#   3. the project: pip install --no-deps --no-build-isolation -e . ; fallback: a symlink shim on PYTHONPATH
#   4. (after 7) pytest -m gpu                                 -> OUT/pytest-gpu.xml
#   5. synth N_IMAGES (default 3000) 600x450 images, pack at 256 px
#   6. bench loader: dali,resident,torch,folder at 224        -> OUT/bench_loader.json
#   7. bench train: resnet50 and resnet18 at 224, bf16, channels_last, compiled; loaders dali and
#      resident                                               -> OUT/bench_train_<model>_<loader>.json
#   8. a short end-to-end `hamengine train` smoke run         -> OUT/train_smoke.json
#   9. summary table                                          -> OUT/summary.md, OUT/summary.json
# Environment: PY (python, default python3), OFFLINE_WHEELS, DALI_WHEEL, SKIP_INSTALL (project already installed), N_IMAGES, BATCH (bench train batch, default
# 256), SUITE_BUDGET (seconds for the whole suite, default 470: under 8 minutes on one H100).
set -euo pipefail

DRY_RUN=
if [[ ${1:-} == --dry-run ]]; then
    DRY_RUN=1
    shift
fi

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
OUT=${1:-${OUT:-./gpu-results}}
mkdir -p "$OUT/logs"
OUT=$(cd "$OUT" && pwd)
# Data and scratch live outside OUT: only a few small result files should travel back from OUT.
WORK=${WORK:-$(mktemp -d -t hamengine-gpu.XXXXXX)}
mkdir -p "$WORK"
PY=${PY:-python3}
N_IMAGES=${N_IMAGES:-3000}
BATCH=${BATCH:-256}
SUITE_BUDGET=${SUITE_BUDGET:-470}
# Sizes and device of the measured steps; --dry-run shrinks them so the whole script runs on a CPU.
DEVICE=cuda SIZE=224 PACK_SIZE=256 LBATCH=128 STEPS=60 WARMUP=15 EPOCHS=2 COMPILE=on AMP=bf16 IMG=600x450
LBATCHES=20 LWARMUP=3 LMIN_S=2  # bench loader: at least 20 batches and 2 s per loader
if [[ -n $DRY_RUN ]]; then
    N_IMAGES=${DRY_N_IMAGES:-60} BATCH=8 SUITE_BUDGET=${DRY_BUDGET:-900}
    DEVICE=cpu SIZE=32 PACK_SIZE=40 LBATCH=8 STEPS=2 WARMUP=1 EPOCHS=1 COMPILE=off AMP=fp32 IMG=80x60
    LBATCHES=2 LWARMUP=1 LMIN_S=0.2
fi
STATUS=$OUT/status.tsv
START=$(date +%s)
printf 'step\texit\tseconds\n' > "$STATUS"

log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$OUT/suite.log"; }

# step NAME TIMEOUT CMD...: run with a timeout bounded by the suite budget; never aborts the suite.
step() {
    local name=$1 limit=$2 rc=0 t0 left
    shift 2
    left=$(( SUITE_BUDGET - ($(date +%s) - START) ))
    if (( left < 10 )); then
        log "skip $name: suite budget spent"
        printf '%s\tskipped\t0\n' "$name" >> "$STATUS"
        return 0
    fi
    (( limit > left )) && limit=$left
    log "run  $name (limit ${limit}s)"
    t0=$(date +%s)
    timeout --kill-after=15 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1 || rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >> "$STATUS"
    if (( rc != 0 )); then
        log "FAIL $name (exit $rc; 124 = timeout), see logs/$name.log"
        tail -5 "$OUT/logs/$name.log" | sed 's/^/      /' | tee -a "$OUT/suite.log" || true
    fi
    return 0
}

# 1. environment
{
    uname -a
    nvidia-smi || true
    "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu",
        torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)' || true
} > "$OUT/env.txt" 2>&1

# 2. DALI from offline wheel parts
install_dali() {
    local parts wheel
    # shellcheck disable=SC2206
    parts=( $DALI_WHEEL )
    if (( ${#parts[@]} == 1 )) && [[ ${parts[0]} == *.whl ]]; then
        wheel=${parts[0]}
    else
        wheel="$WORK/$(basename "${parts[0]%%.part*}")"
        [[ $wheel == *.whl ]] || wheel="$wheel.whl"
        cat $(printf '%s\n' "${parts[@]}" | sort) > "$wheel"
    fi
    "$PY" -m pip install --no-index --no-deps "$wheel"
}
install_offline() {
    bash "$OFFLINE_WHEELS/offline-wheels.sh" install "$OFFLINE_WHEELS" "$WORK/site"
}
if ! "$PY" -c 'import nvidia.dali' >/dev/null 2>&1; then
    if [[ -n ${OFFLINE_WHEELS:-} ]]; then
        step dali_install 180 install_offline
        export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
    elif [[ -n ${DALI_WHEEL:-} ]]; then
        step dali_install 120 install_dali
    else
        log "DALI not importable and DALI_WHEEL not given: dali steps will fail and be recorded"
    fi
fi

# 3. the project
install_shim() {  # hamengine.<part> from the repo folders without installing (package_dir by symlinks)
    local shim="$WORK/shim/hamengine" f
    rm -rf "$WORK/shim" && mkdir -p "$shim"
    for f in "$REPO"/hamengine/*; do ln -s "$f" "$shim/$(basename "$f")"; done
    for f in engine loaders models bench; do ln -s "$REPO/$f" "$shim/$f"; done
    echo "$WORK/shim"
}
if [[ -n ${SKIP_INSTALL:-} ]]; then
    printf 'install\tskipped\t0\n' >> "$STATUS"
elif [[ -n $DRY_RUN ]]; then  # never pip-install into the caller's environment: exercise the shim
    export PYTHONPATH="$(install_shim)${PYTHONPATH:+:$PYTHONPATH}"
    printf 'install\tshim\t0\n' >> "$STATUS"
elif ! (cd "$REPO" && "$PY" -m pip install --no-deps --no-build-isolation -e . > "$OUT/logs/install.log" 2>&1); then
    log "pip install -e failed (logs/install.log): using a PYTHONPATH shim"
    export PYTHONPATH="$(install_shim)${PYTHONPATH:+:$PYTHONPATH}"
    printf 'install\tshim\t0\n' >> "$STATUS"
else
    printf 'install\t0\t0\n' >> "$STATUS"
fi
HAM=("$PY" -m hamengine)

# DALI is usable only when a pipeline builds and runs (imports alone miss nvImageCodec / nvCOMP).
step dali_check 60 "$PY" -c 'from hamengine.loaders.kinds.dali import dali_status
s = dali_status()
print(s or "DALI builds and runs a pipeline")
raise SystemExit(1 if s else 0)'


# 5. data
step synth 120 "${HAM[@]}" synth --out "$WORK/synth" --n "$N_IMAGES" --size "$IMG" --json
step pack 90 "${HAM[@]}" pack --source "$WORK/synth" --out "$WORK/pack" --size "$PACK_SIZE" --json
PACK="$WORK/pack"

# 6. loaders
step bench_loader 150 bash -c "$(printf '%q ' "${HAM[@]}") bench loader --pack $(printf '%q' "$PACK") \
    --source $(printf '%q' "$WORK/synth") --loaders dali,resident,torch,folder --size $SIZE --batch-size $LBATCH \
    --batches $LBATCHES --warmup $LWARMUP --min-seconds $LMIN_S --device $DEVICE --json > $(printf '%q' "$OUT/bench_loader.json")"

# 7. training step throughput (resnet50 first: the inductor cache then serves the second loader)
for model in resnet50 resnet18; do
    for loader in dali resident; do
        step "bench_train_${model}_${loader}" 150 "${HAM[@]}" bench train --pack "$PACK" --model "$model" \
            --loader "$loader" --size "$SIZE" --batch-size "$BATCH" --amp-dtype "$AMP" --channels-last \
            --compile "$COMPILE" --device "$DEVICE" --steps "$STEPS" --warmup "$WARMUP" --out "$OUT/bench_train_${model}_${loader}.json"
    done
done

# GPU tests, after the headline numbers (a hang here cannot cost them)
step pytest_gpu 150 "$PY" -m pytest -m gpu -q -p no:cacheprovider --junitxml "$OUT/pytest-gpu.xml" "$REPO/tests"

# 8. end to end: train (compiled, bf16, channels_last by default on CUDA) + test evaluation
step train_smoke 120 bash -c "$(printf '%q ' "${HAM[@]}") train --pack $(printf '%q' "$PACK") --model resnet18 \
    --epochs $EPOCHS --batch-size $LBATCH --size $SIZE --device $DEVICE $([[ -n $DRY_RUN ]] && echo --no-pretrained) --out $(printf '%q' "$WORK/run-smoke") --json \
    > $(printf '%q' "$OUT/train_smoke.json")"

# 9. summary
"$PY" - "$OUT" <<'PYEOF' || log "summary failed"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(p):
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None
rows = [line.split("\t") for line in (out / "status.tsv").read_text().splitlines()[1:]]
summary = {"status": {r[0]: {"exit": r[1], "seconds": r[2]} for r in rows}, "bench_train": [], "bench_loader": None}
lines = ["# hamengine GPU suite", "", "| step | exit | seconds |", "|---|---|---|"]
lines += [f"| {r[0]} | {r[1]} | {r[2]} |" for r in rows]
# Targets of one H100/H200 at 224 px, shown beside the numbers (BENCHMARKS.md records them with the card).
TRAIN_TARGET = {"resnet50": (3000, 0.97)}  # img/s, stall_ratio; end to end, bf16, channels_last, compiled
LOADER_TARGET = {"dali": 20000, "resident": 100000}  # img/s, loader alone


def setting(r):
    """What the row really ran: 'compiled' only when compilation held (bench train's compile flag)."""
    parts = [f"{r.get('size')} px", str(r.get("amp_dtype")), "channels_last" if r.get("channels_last") else "NCHW",
             "compiled" if r.get("compile") else ("eager (compile failed)" if r.get("compile_failed") else "eager")]
    return ", ".join(parts)


def target_cell(value, target, fmt):
    if target is None:
        return ""
    met = value is not None and value >= target
    return f"{fmt.format(target)} ({'met' if met else 'NOT met'})"


lines += ["", "## bench train", "",
          "| model | loader | setting | img/s | target img/s | synthetic img/s | stall_ratio | target stall | warm-up s |",
          "|---|---|---|---|---|---|---|---|---|"]
for p in sorted(out.glob("bench_train_*.json")):
    r = load(p)
    if r:
        summary["bench_train"].append(r)
        ips_t, stall_t = TRAIN_TARGET.get(r["model"], (None, None))
        if r.get("error"):  # the loader failed; the synthetic ceiling was still measured
            lines.append(f"| {r['model']} | {r['loader']} | {setting(r)} | failed: {r['error']} | "
                         f"{target_cell(None, ips_t, '{:,}')} | {r['synthetic_img_per_s']:.0f} | - | | {r['warmup_s']:.1f} |")
            continue
        lines.append(f"| {r['model']} | {r['loader']} | {setting(r)} | {r['img_per_s']:.0f} | "
                     f"{target_cell(r['img_per_s'], ips_t, '{:,}')} | {r['synthetic_img_per_s']:.0f} | "
                     f"{r['stall_ratio']:.3f} | {target_cell(r['stall_ratio'], stall_t, '{:.2f}')} | {r['warmup_s']:.1f} |")
bl = load(out / "bench_loader.json")
if bl:
    summary["bench_loader"] = bl
    lines += ["", f"## bench loader ({bl.get('size')} px, at least {bl.get('batches')} batches and "
              f"{bl.get('min_seconds')} s per loader)", "",
              "| loader | img/s | target img/s | x folder |", "|---|---|---|---|"]
    for r in bl.get("results", []):
        ratio = r.get("ratio_to_folder")
        tgt = LOADER_TARGET.get(r.get("loader"))
        if r.get("error"):
            lines.append(f"| {r.get('loader')} | failed: {r['error']} | {target_cell(None, tgt, '{:,}')} | |")
            continue
        lines.append(f"| {r.get('loader')} | {r.get('img_per_s', 0):.0f} | "
                     f"{target_cell(r.get('img_per_s'), tgt, '{:,}')} | {'' if ratio is None else f'{ratio:.1f}'} |")
smoke = load(out / "train_smoke.json")
if smoke:
    summary["train_smoke"] = smoke
    lines += ["", f"train smoke: best val balanced accuracy {smoke.get('best_val_balanced_accuracy')}, "
              f"warm-up {smoke.get('warmup_s')} s, compile_failed {smoke.get('compile_failed')}"]
(out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PYEOF
log "done in $(( $(date +%s) - START )) s; results in $OUT"
# The dry run is CI's check of this script: any failed step fails it (the GPU run always ends 0 so
# that its partial results come back; the table says what failed).
if [[ -n $DRY_RUN ]]; then
    failed=$(awk -F'\t' 'NR > 1 && $2 != "0" && $2 != "shim" && $2 != "skipped" {print $1}' "$STATUS" | tr '\n' ' ')
    if [[ -n $failed ]]; then
        log "dry run FAILED: $failed"
        exit 1
    fi
fi
