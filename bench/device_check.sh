#!/usr/bin/env bash
# small4 device check: the one script to run when a CUDA machine (H100/H200, sm_90) is lent. ~8 minutes at most.
#
#   bash bench/device_check.sh              # on the GPU machine, from anywhere in the repo
#   DRYRUN=1 bash bench/device_check.sh     # rehearsal on a CPU: tiny shapes, Triton interpreter (a test runs it)
#   bash bench/device_check.sh prepare      # on a machine with the package registry: wheels -> tmp/device_wheels
#   ONLY=env,graphs bash bench/device_check.sh   # just these stages (the others are recorded as not selected)
#
# Needs only torch and triton: `small4 bench` and the engine import nothing else (see README, "Bare CUDA image").
# pytest, for the kernel-test stage, may be missing on a bare image: `prepare` downloads it with the server and chat
# libraries; carry tmp/device_wheels with the tree and the deps stage installs them into a side folder.
#
# Stages, each under its own time cap and all under DEADLINE seconds (what does not fit is recorded as skipped):
#   env -> deps (wheels, if any) -> imports -> pytest (kernel + graph tests on CUDA, SMALL4_TEST_DEVICE=cuda)
#   -> kernels (every Triton kernel vs its twin at the real shapes) -> graphs (capture + replay vs eager, 2 layers)
#   -> host_overhead -> full_l4 (bench full, 4 layers, fp8, graphs) -> full_l36 (all 36 layers) -> tune_moe (short grid)
# Results in $OUT (default bench/results/device-check-<UTC time>/): summary.json (device, commit, every stage's
# rc and seconds; rewritten as each stage ends, so a timeout keeps what finished), logs.txt, and one JSON per stage.
# The commit is `git rev-parse HEAD`, or $SMALL4_COMMIT where the copy of the tree has no .git.
set -u
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
WHEELS=${WHEELS:-$ROOT/tmp/device_wheels}
PY=${PY:-python3}

if [ "${1:-}" = prepare ]; then  # the CUDA image's python is 3.12: cp312 manylinux wheels, no dependencies resolved
  mkdir -p "$WHEELS"
  pip download -q -d "$WHEELS" --only-binary=:all: --python-version 3.12 --implementation cp --no-deps \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    pytest pluggy iniconfig packaging \
    mistral-common pydantic pydantic-core pydantic-extra-types annotated-types typing-inspection jsonschema \
    jsonschema-specifications referencing rpds-py pycountry llguidance fastapi starlette uvicorn
  du -sh "$WHEELS"; exit 0
fi

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=${OUT:-$ROOT/bench/results/device-check-$STAMP}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/small4-devcheck.XXXXXX)
DEADLINE=${DEADLINE:-480}
START=$(date +%s)
LOG=$OUT/logs.txt
ST=$WORK/stages.jsonl
: >"$LOG"; : >"$ST"
COMMIT=${SMALL4_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
export PYTHONDONTWRITEBYTECODE=1 PYTHONPATH=$WORK/deps:$ROOT${PYTHONPATH:+:$PYTHONPATH}
export TRITON_INTERPRET=0 SMALL4_KERNELS=auto SMALL4_TEST_DEVICE=cuda TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton-cache}
SMALL=; TINY=; L4=4; BENCHENV=env
PYTESTS="tests/kernels tests/engine/test_cuda_graphs.py tests/engine/test_step_inputs.py tests/spec/test_spec_graphs.py"
L4_ARGS="--batch-sizes 1,8,64 --contexts 1024 --decode-steps 5 --warmup-steps 2 --prefill-len 2048 --repeats 2
  --serving-concurrency 4 --serving-input-len 128 --serving-output-len 16 --speculative-concurrency 4"
L36_ARGS="--batch-sizes 1,8,64,256 --contexts 1024,8192 --decode-steps 10 --warmup-steps 2 --prefill-len 8192
  --repeats 2 --serving-concurrency 32 --serving-input-len 256 --serving-output-len 64 --speculative-concurrency none"
HOST_ARGS="--steps 10 --modes greedy,sampled,penalties"
TUNE_ARGS="--dtype fp8 --tokens 4,64,1024 --repeats 5"
TUNE_GRID='{"BLOCK_M": [16, 64], "BLOCK_N": [64, 128], "BLOCK_K": [64], "num_warps": [4], "num_stages": [3]}'
if [ -n "${DRYRUN:-}" ]; then  # CPU rehearsal: tiny shapes, the kernels under the interpreter, benches on the twins
  export TRITON_INTERPRET=1 SMALL4_KERNELS=triton SMALL4_TEST_DEVICE=cpu TRITON_CACHE_DIR=/tmp/triton-cache-dry
  SMALL=--small; TINY=--tiny; L4=1; BENCHENV="env SMALL4_KERNELS=reference"
  PYTESTS="tests/engine/test_cuda_graphs.py::test_ladder_covers_every_batch_with_bounded_padding"
  L4_ARGS="--batch-sizes 1 --contexts 8 --decode-steps 1 --warmup-steps 1 --prefill-len 8 --repeats 1
    --serving-concurrency 2 --serving-input-len 6 --serving-output-len 3"
  L36_ARGS=$L4_ARGS
  HOST_ARGS="--steps 2 --warmup-steps 1 --batch-sizes 1,4 --modes greedy --prompt-len 8"
  TUNE_ARGS="--tiny --tokens 4 --repeats 1"
  TUNE_GRID=
fi

elapsed() { echo $(( $(date +%s) - START )); }

summary() {  # summary.json: the environment, the commit and every stage so far (rewritten after each stage)
  $PY - "$OUT" "$ST" "$COMMIT" "${DRYRUN:-}" "$(elapsed)" <<'PY_EOF'
import json, os, sys
out, stages, commit, dry, elapsed = sys.argv[1:]
env = {}
if os.path.exists(f"{out}/env.json"):
    env = json.load(open(f"{out}/env.json"))
rows = [json.loads(line) for line in open(stages) if line.strip()]
doc = {"check": "small4 device check", "dryrun": bool(dry), "commit": commit, "device": env.get("device"),
       "env": env, "elapsed_s": int(elapsed), "stages": rows}
for name in ("kernels", "graphs"):
    if os.path.exists(f"{out}/{name}.json"):
        doc[f"{name}_summary"] = json.load(open(f"{out}/{name}.json")).get("summary")
json.dump(doc, open(f"{out}/summary.json", "w"), indent=1)
PY_EOF
}

stage() {  # stage NAME CAP_SECONDS CMD... : CMD under min(CAP, time left); its output goes to logs.txt
  local name=$1 cap=$2; shift 2
  if [ -n "${ONLY:-}" ] && [[ ",$ONLY," != *",$name,"* ]]; then
    echo "{\"stage\":\"$name\",\"status\":\"skipped: not in ONLY\",\"at\":$(elapsed)}" >>"$ST"; summary; return
  fi
  local left=$(( DEADLINE - $(elapsed) )); local t=$(( left < cap ? left : cap ))
  if [ "$t" -lt 20 ]; then
    echo "{\"stage\":\"$name\",\"status\":\"skipped: no time\",\"at\":$(elapsed)}" >>"$ST"; summary; return
  fi
  echo "===== $name (limit ${t}s, at $(elapsed)s)" >>"$LOG"
  local t0=$(date +%s)
  timeout -k 10 "$t" "$@" >>"$LOG" 2>&1; local rc=$?
  local status=ok; [ $rc -ne 0 ] && status=failed; [ $rc -eq 124 ] && status=timeout
  echo "{\"stage\":\"$name\",\"status\":\"$status\",\"rc\":$rc,\"seconds\":$(( $(date +%s) - t0 )),\"limit\":$t,\"at\":$(elapsed)}" >>"$ST"
  summary
  echo "[$(elapsed)s] $name: $status (rc $rc)"
}

# ---- env: what ran where
stage env 30 $PY -c "
import json, os, platform, sys, torch, triton
from small4.bench.results import device_name
cuda = torch.cuda.is_available()
env = {'device': device_name(), 'python': sys.version.split()[0], 'torch': torch.__version__,
       'cuda': torch.version.cuda, 'triton': triton.__version__, 'cpus': os.cpu_count(), 'host': platform.node()}
if cuda:
    p = torch.cuda.get_device_properties(0)
    env.update(capability=list(torch.cuda.get_device_capability()), sms=p.multi_processor_count,
               memory_mib=p.total_memory >> 20)
json.dump(env, open('$OUT/env.json', 'w'), indent=1); print(env)"
command -v nvidia-smi >/dev/null && nvidia-smi >>"$LOG" 2>&1
[ -d "$ROOT/tmp/triton_cache" ] && mkdir -p "$TRITON_CACHE_DIR" && cp -r "$ROOT/tmp/triton_cache/." "$TRITON_CACHE_DIR/"

# ---- deps: offline wheels into a side folder (only what a stage needs beyond torch + triton)
if [ -z "${DRYRUN:-}" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  stage deps 60 $PY -m pip install -q --no-index --no-deps --target "$WORK/deps" "$WHEELS"/*.whl
fi
stage imports 30 $PY -c "
import small4.engine.engine, small4.kernels.fused_moe, small4.kernels.mla_decode, small4.kernels.latent_write
from small4.cli import build_parser
build_parser('bench').parse_args(['bench', 'host-overhead'])
print('imports ok')"

# ---- tests on the device
if $PY -c "import pytest" 2>/dev/null; then
  stage pytest 120 $PY -m pytest -q -p no:cacheprovider --junitxml="$OUT/pytest.xml" $PYTESTS
else
  echo "{\"stage\":\"pytest\",\"status\":\"skipped: pytest not installed (bash bench/device_check.sh prepare)\"}" >>"$ST"
fi
stage kernels 150 $PY bench/gpu_check.py "$OUT/kernels.json" kernels $SMALL
stage graphs 90 $PY bench/gpu_check.py "$OUT/graphs.json" graphs $SMALL

# ---- benchmarks: the CLI itself (it imports only torch + triton for bench)
stage host_overhead 60 $PY -m small4.cli bench host-overhead $HOST_ARGS --out "$OUT/host_overhead.json"
if [ "$(elapsed)" -lt $(( DEADLINE / 2 )) ]; then
  stage full_l4 80 $BENCHENV $PY -m small4.cli bench full $TINY --layers $L4 --dtype fp8 --cuda-graph $L4_ARGS \
    --out "$OUT/full_l4.json"
fi
stage full_l36 240 $BENCHENV $PY -m small4.cli bench full $TINY --dtype fp8 --cuda-graph $L36_ARGS \
  --out "$OUT/full_l36.json"
cat >"$WORK/tune.py" <<'TUNE_EOF'
import json, os, sys
from small4.bench import tune_moe
from small4.cli import main
if os.environ.get("TUNE_GRID"):  # a short grid: the full one needs 7-10 minutes of cold compiles
    tune_moe.FULL_GRID = json.loads(os.environ["TUNE_GRID"])
sys.exit(main(["bench", "tune-moe", *sys.argv[1:]]))
TUNE_EOF
export TUNE_GRID
stage tune_moe 90 $BENCHENV $PY "$WORK/tune.py" $TUNE_ARGS --out "$OUT/tune_moe.json"

summary
echo "done in $(elapsed)s: $OUT/summary.json"
cat "$ST"
