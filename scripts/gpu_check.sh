#!/usr/bin/env bash
# The GPU checks of the speed work, in one go, for whoever has a CUDA machine at hand:
# the GPU tests, the benchmark (and that of packed sweeps, issue 23), and a timed replay of the
# whole ablation (9 runs) one job at a time and packed with 10 seeds (90 runs), then (time
# allowing) three jobs sharing the GPU and torch.compile / CUDA graphs.
# Ends within BUDGET_S seconds (600: 10 minutes; 780 leaves room for the optional steps; REPLAY_S: the
# replay's own limit, 150 s; REPLAY_PACKED_S: the packed replay's, 240 s);
# every figure goes into one file.
#
#   scripts/gpu_check.sh [OUT_DIR]       # on the GPU machine, from anywhere; OUT_DIR: outputs/gpu_check/<time>
#   scripts/gpu_check.sh --pack [DIR]    # on a machine with the project's venv: copy the pure-Python
#                                        # packages a bare GPU image may lack (hydra-core, omegaconf,
#                                        # antlr4, the joblib launcher) into DIR (outputs/gpu_deps);
#                                        # the check puts DIR on PYTHONPATH when it exists
#
# OUT_DIR receives gpu_check.json (all figures), bench.json, bench_64px.json, bench_packed.json and
# gpu_check.log (every step's output); training runs go to a temporary dir. Each step has its own
# time limit, so a slow or failing step costs its share only; the summary is written whatever happens. Exit status:
# 0 all steps passed, 1 some step failed or timed out, 2 no CUDA device.
# To rehearse the script itself on a CPU: GPU_CHECK_ON_CPU=1 BENCH_ARGS=--quick BUDGET_S=240 scripts/gpu_check.sh
# (REPLAY_ARGS: overrides added to every replay, e.g. 'trainer.max_epochs=1 data.image_size=64' for a rehearsal
# whose replays end within their limits)
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
if [ -z "${PYTHON:-}" ]; then  # the project's venv where there is one, else the image's python3
    PYTHON=python3
    [ -x .venv/bin/python ] && PYTHON=.venv/bin/python
fi

if [ "${1:-}" = "--pack" ]; then
    dest=${2:-outputs/gpu_deps}
    site=$("$PYTHON" -c "import omegaconf, os; print(os.path.dirname(os.path.dirname(omegaconf.__file__)))")
    mkdir -p "$dest/hydra_plugins"
    for package in hydra omegaconf antlr4; do
        rm -rf "${dest:?}/$package" && cp -r "$site/$package" "$dest/"
    done
    [ -d "$site/hydra_plugins/hydra_joblib_launcher" ] && cp -r "$site/hydra_plugins/hydra_joblib_launcher" "$dest/hydra_plugins/"
    find "$dest" -name __pycache__ -prune -exec rm -rf {} +
    echo "packed into $dest ($(du -sh "$dest" | cut -f1)); carry it to the GPU machine"
    exit 0
fi

OUT_DIR=${1:-outputs/gpu_check/$(date +%Y-%m-%d_%H-%M-%S)}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
RUNS=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_runs.XXXXXX")
LOG=$OUT_DIR/gpu_check.log
: > "$LOG"
export PYTHONUNBUFFERED=1 HYDRA_FULL_ERROR=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
[ -d outputs/gpu_deps ] && export PYTHONPATH="$ROOT/outputs/gpu_deps:$PYTHONPATH"
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-600} ))  # every step ends by then; the summary takes seconds
FAILED=0
declare -A STEP_MS STEP_STATUS

# step NAME LIMIT_S COMMAND...: run with a time limit (cut to the deadline), output into the log
step() {
    local name=$1 limit=$2
    shift 2
    local left=$(( DEADLINE - $(date +%s) ))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 10 ]; then
        STEP_STATUS[$name]="skipped: out of time"; STEP_MS[$name]=0; FAILED=1
        echo "=== $name: skipped, out of time" | tee -a "$LOG"
        return
    fi
    local begin=$(date +%s%N)
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    timeout --signal=INT --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
    local rc=$?
    STEP_MS[$name]=$(( ($(date +%s%N) - begin) / 1000000 ))
    case $rc in
        0) STEP_STATUS[$name]=ok ;;
        124|137) STEP_STATUS[$name]=timeout; FAILED=1 ;;
        *) STEP_STATUS[$name]="failed ($rc)"; FAILED=1 ;;
    esac
    echo "=== $name: ${STEP_STATUS[$name]} in $(( STEP_MS[$name] / 1000 )) s" | tee -a "$LOG"
}

if [ -z "${GPU_CHECK_ON_CPU:-}" ] && ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >> "$LOG" 2>&1; then
    echo "no CUDA device here: nothing to check (see $LOG)"
    exit 2
fi
missing=$("$PYTHON" -c "
import importlib.util as u
print(' '.join(m for m in ('hydra', 'omegaconf', 'pytorch_lightning', 'torchmetrics', 'tensorboard', 'PIL', 'matplotlib') if u.find_spec(m) is None))")
if [ -n "$missing" ]; then
    echo "missing Python packages: $missing; run 'scripts/gpu_check.sh --pack' where the venv is and carry outputs/gpu_deps" | tee -a "$LOG"
    exit 1
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PYTHON" -c "import torch, pytorch_lightning as pl; print('torch', torch.__version__, 'lightning', pl.__version__, 'cuda', torch.version.cuda)"
} >> "$LOG" 2>&1

# 1. the embedded data set (generated and preprocessed on first use), so later steps time training only
step data 90 "$PYTHON" -c "
from hydra import compose, initialize_config_dir
from alexnet_lab.cli import load
from alexnet_lab.config import LabConfig
from alexnet_lab.data.datamodule import ImageFolderDataModule
with initialize_config_dir(config_dir='$ROOT/conf', version_base='1.3'):
    cfg = compose('config', overrides=['run_name=gpu_check', 'data.progress=false'])
dm = ImageFolderDataModule(load(cfg, LabConfig).data, seed=cfg.seed); dm.prepare_data(); dm.setup('fit')
print(len(dm.cache), 'images in the cache')"

# 2. the GPU tests (and the rest of the speed-path tests)
step tests 60 "$PYTHON" -m pytest -q -p no:cacheprovider -m "not slow" tests/test_speed_paths.py

# 3. the benchmark: Lightning vs bare on the GPU, bf16, channels-last, preprocessing
# (two rounds of the three contenders, not the default three: the budget)
step bench 120 "$PYTHON" scripts/bench.py --json --rounds 2 --out "$OUT_DIR/bench.json" ${BENCH_ARGS:-}
# where the model costs least (64 px, downscale 16), the lab's own cost shows most (issue 14's case)
QUICK=$([[ "${BENCH_ARGS:-}" == *--quick* ]] && echo --quick)  # a rehearsal's --quick, not its other arguments
step bench_64px 80 "$PYTHON" scripts/bench.py --json --rounds 2 --out "$OUT_DIR/bench_64px.json" data.image_size=64 $QUICK \
    --downscales 16
# packed sweeps (issues 23, 27) where they should pay most: 16 seeds as one pack, fused and in turn, against the
# same 16 runs one after another and 16 bare loops, at 64 px / downscale 16 (two rounds, not four: the budget)
step bench_packed 180 "$PYTHON" scripts/bench.py --packed 16 --forms fused,in_turn --json --rounds 2 \
    --out "$OUT_DIR/bench_packed.json" data.image_size=64 $QUICK --downscales 16

# 4. the whole ablation replay, one job at a time (the basic launcher); with 10 seeds each in packs (the 90 runs as
# packs of the jobs that differ only in what a pack may vary); then (time allowing) three jobs sharing the GPU
read -ra REPLAY_EXTRA <<< "${REPLAY_ARGS:-}"
REPLAY=("experiment=glob(ablation_*)" trainer.enable_progress_bar=false data.progress=false ${REPLAY_EXTRA[@]+"${REPLAY_EXTRA[@]}"})
step replay "${REPLAY_S:-150}" "$PYTHON" train.py -m "${REPLAY[@]}" "hydra.sweep.dir=$RUNS/replay"
step replay_packed "${REPLAY_PACKED_S:-240}" "$PYTHON" train.py -m "${REPLAY[@]}" "seed=range(10)" hydra/sweeper=packed \
    "hydra.sweep.dir=$RUNS/replay_packed"
left=$(( DEADLINE - $(date +%s) ))
if [ "$left" -ge 60 ] && "$PYTHON" -c "import hydra_plugins.hydra_joblib_launcher" 2>/dev/null; then
    step replay_3_jobs "$left" "$PYTHON" train.py -m "${REPLAY[@]}" "hydra.sweep.dir=$RUNS/replay_3_jobs" \
        hydra/launcher=joblib hydra.launcher.n_jobs=3
else
    echo "=== replay_3_jobs skipped (${left}s left, or no joblib launcher)" | tee -a "$LOG"
fi

# 5. with time left: torch.compile and CUDA graphs (mode reduce-overhead) on the training step at downscale 16
left=$(( DEADLINE - $(date +%s) ))
if [ "$left" -ge 90 ]; then
    step compile "$left" "$PYTHON" scripts/bench.py --quick --compile --downscales 16 --json --out "$OUT_DIR/bench_compile.json"
else
    echo "=== compile skipped (${left}s left; BUDGET_S=600 leaves room for it)" | tee -a "$LOG"
fi

# the summary: every figure in one JSON file
steps_json=$(for name in "${!STEP_STATUS[@]}"; do printf '"%s": {"status": "%s", "ms": %s}, ' "$name" "${STEP_STATUS[$name]}" "${STEP_MS[$name]}"; done)
"$PYTHON" - "$OUT_DIR" "$RUNS" "{${steps_json%, }}" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
from pathlib import Path

out, runs, steps = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
summary = {"steps": steps}
bench = out / "bench.json"
summary["bench"] = json.loads(bench.read_text()) if bench.exists() else None
small = out / "bench_64px.json"
if small.exists():
    found = json.loads(small.read_text())
    keys = ("lightning_vs_bare", "lightning_vs_bare_aug", "floor_vs_bare", "lightning_vs_floor")
    keys += ("floor_step_overhead_ms", "difference_ms", "epoch_overhead_ms", "step_overhead_ms")
    summary["bench_64px"] = {key: found.get(key) for key in keys}
packed = out / "bench_packed.json"
if packed.exists():
    found = json.loads(packed.read_text())
    keys = ("packed", "packed_vs_bare", "packed_vs_bare_spread", "packed_vs_unpacked", "packed_vs_unpacked_spread")
    keys += ("fused_vs_bare", "fused_vs_bare_spread", "fused_vs_in_turn", "fused_vs_in_turn_spread")
    summary["bench_packed"] = {key: found.get(key) for key in (*keys, "images_per_s", "packed_runs_ok", "quick")}
compiled = out / "bench_compile.json"
if compiled.exists():
    found = json.loads(compiled.read_text())
    summary["compile"] = {key: found.get(key) for key in ("compile_speedup", "compile_first_round_s", "step_ms")}
for name in ("replay", "replay_packed", "replay_3_jobs"):
    paths = sorted((runs / name).glob("*/metrics.json"))
    found = [json.loads(path.read_text()) for path in paths]
    if not found:
        continue
    # per Lightning run: the members of a pack share its epochs and its wall time (pack.wall_s), so a pack counts once
    training, walls = {}, {}
    for path, m in zip(paths, found):
        where = (m.get("pack") or {}).get("id") or str(path.parent)
        seconds = sum(row.get("epoch_s", 0.0) for row in m.get("history", []))
        training[where] = max(training.get(where, 0.0), seconds)  # a pack's longest member
        walls[where] = (m.get("pack") or {}).get("wall_s", m.get("wall_s", 0.0))
    summary[name] = {
        "runs": len(found),
        "statuses": [m.get("status") for m in found],
        "epochs": sum(m.get("epochs", 0) for m in found),
        # training time: every epoch of every run (train + val), as the runs' histories time it
        "training_s": round(sum(training.values()), 2),
        "runs_wall_s": round(sum(walls.values()), 2),  # each run's (or pack's) whole train(): setup and test too
        "command_wall_s": steps.get(name, {}).get("ms", 0) / 1000,
        "test_acc": {path.parent.name: m.get("test_acc") for path, m in zip(paths, found)},
        # with several GPUs, the jobs of replay_3_jobs take one each, round robin (train.py: own_gpu)
        "devices": [m.get("device") for m in found],
    }
    if name == "replay_packed":
        summary[name]["packs"] = len({m["pack"]["id"] for m in found if m.get("pack")})
        summary[name]["forms"] = sorted({(m["pack"].get("form"), m["pack"].get("form_ratio")) for m in found if m.get("pack")}, key=str)
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps({k: v for k, v in summary.items() if k != "bench"}, indent=2))
EOF
rm -rf "$RUNS"
echo "figures: $OUT_DIR/gpu_check.json (log: $LOG)"
exit $FAILED
