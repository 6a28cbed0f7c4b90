#!/usr/bin/env bash
# One command that makes a GPU session count (torch 2.11 + triton 3.6 + a CUDA GPU, < 9.5 min
# with every step at its limit: the lent machines stop a command at 10):
#
#     bench/gpu_session.sh OUTDIR                       # OUTDIR must be new or empty
#     bench/gpu_session.sh --sweeps OUTDIR              # the second command: the three sweeps
#     bench/gpu_session.sh --dry-run [--sweeps] OUTDIR  # print the steps and the files, run nothing
#
# Steps, each under its own time limit (seconds):
#   1. record the GPU (nvidia-smi), torch/triton/python/CUDA versions, the commit
#   2. python -m bench.compile for the device's own capability (also warms Triton's cache
#      for the tests: the same kernels, the same cache keys)                          120
#   3. the whole test suite, compiled on the GPU (pytest's closing line kept), in 8 processes
#      where pytest-xdist is installed, each test under 120 s where pytest-timeout is  300
#   4. python -m bench --quick (its seed-000 case also times both fusions, fwd_small_bf16 the
#      descriptor forward: more compiling than the three cases alone)                    110
# A step past its limit gets SIGINT, then SIGKILL 5 s later; either is reported as a timeout.
# Files (8, one folder deep): summary.txt (GPU, versions, commit, each step's status and time,
# the compile verdict, pytest's closing line), session.log (nvidia-smi, the compile table,
# pytest's full output, the benchmark's output), bench/ (python -m bench's 6 files:
# results.json, summary.md, run.log and 3 PNG plots).
#
# With --sweeps, after step 1:
#   2. python -m bench.backward: the fused layer backward against two kernels         130
#   3. python -m bench.tiles: the per-layer GEMM tiles against the heuristic              200
#   4. python -m bench --host: host time per call, and the host cases end to end on the GPU 150
# Files (8, one folder deep): summary.txt, session.log, backward/ (backward.json, backward.md),
# tiles/ (tiles.json, tiles.md), host/ (host.json, host.md).
# Without CUDA it stops at once, before writing anything, with status 2. With a git checkout the
# commit is read from git; otherwise (the lent machines copy the work tree without .git) set
# BENCH_GIT_COMMIT=<sha> on the command line: every report of the session then carries it.
# The exit status is 1 if a step failed or ran out of time.
set -uo pipefail

dry=0
sweeps=0
while [[ ${1:-} == --dry-run || ${1:-} == --sweeps ]]; do
    [[ $1 == --dry-run ]] && dry=1
    [[ $1 == --sweeps ]] && sweeps=1
    shift
done
if [[ $# -ne 1 || ${1:-} == -* ]]; then
    echo "usage: bench/gpu_session.sh [--dry-run] [--sweeps] OUTDIR" >&2
    exit 2
fi
out=$1
[[ $out == /* ]] || out=$PWD/$out  # relative to where the command was typed, not the repository
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo" || exit 2
# python3: on the lent GPU machines the interpreter that holds torch is `python3` (a plain
# `python` may be missing there); PYTHON=... to choose another.
PY=${PYTHON:-python3}

COMPILE_S=120
PYTEST_S=300
BENCH_S=110
BACKWARD_S=130
TILES_S=200
HOST_S=150
GRACE_S=5  # SIGINT at the limit, SIGKILL this much later

if ((dry && sweeps)); then
    cat <<EOF
bench/gpu_session.sh --sweeps $out (dry run: nothing is run)
  1. record: nvidia-smi; $PY: torch, triton, python, CUDA versions, GPU name and capability; git commit
  2. [${BACKWARD_S} s] $PY -m bench.backward --out $out/backward
  3. [${TILES_S} s] $PY -m bench.tiles --budget-s $((TILES_S - 50)) --out $out/tiles
  4. [${HOST_S} s] $PY -m bench --host --out $out/host
files:
  $out/summary.txt
  $out/session.log
  $out/backward/backward.json, backward.md
  $out/tiles/tiles.json, tiles.md
  $out/host/host.json, host.md
EOF
    exit 0
fi
if ((dry)); then
    cat <<EOF
bench/gpu_session.sh $out (dry run: nothing is run)
  1. record: nvidia-smi; $PY: torch, triton, python, CUDA versions, GPU name and capability; git commit
  2. [${COMPILE_S} s] $PY -m bench.compile --target <capability> --jobs 8 --all --out <tmp>
  3. [${PYTEST_S} s] $PY -m pytest [-n 8] [--timeout 120]   (compiled kernels on the GPU)
  4. [${BENCH_S} s] $PY -m bench --quick --no-progress --out $out/bench
files:
  $out/summary.txt
  $out/session.log
  $out/bench/results.json, summary.md, run.log, times.png, speedup.png, roofline.png
EOF
    exit 0
fi

# No CUDA: stop before anything is written.
if ! cap=$("$PY" -c '
import sys, torch
if not torch.cuda.is_available():
    sys.exit("no CUDA device: bench/gpu_session.sh needs an NVIDIA GPU with a working CUDA "
             "torch (torch.cuda.is_available() is False); nothing was run or written")
major, minor = torch.cuda.get_device_capability()
print(major * 10 + minor)
'); then
    exit 2
fi
if [[ -e $out && -n $(ls -A "$out" 2>/dev/null) ]]; then
    echo "bench/gpu_session.sh: $out is not empty; give a new or empty folder (at most 8 files are written)" >&2
    exit 2
fi
mkdir -p "$out"
summary=$out/summary.txt
log=$out/session.log
: >"$summary"
: >"$log"
say() { echo "$*" | tee -a "$summary" "$log"; }
section() { printf '\n===== %s =====\n' "$*" >>"$log"; }

start=$SECONDS
failed=0
step() {  # step NAME LIMIT command...: run with a time limit, output to the log, status to the summary
    local name=$1 limit=$2
    shift 2
    section "$name: $*"
    local t0=$SECONDS
    timeout --signal=INT --kill-after="$GRACE_S" "$limit" "$@" >>"$log" 2>&1
    local rc=$?
    local what="ok"
    if ((rc == 124 || rc == 137)); then  # 137: it ignored SIGINT and was killed
        what="TIMED OUT after ${limit} s"
        failed=1
    elif ((rc != 0)); then
        what="FAILED (status $rc)"
        failed=1
    fi
    say "$name: $what, $((SECONDS - t0)) s"
    return 0
}

# 1. The machine, the versions, the commit.
section "nvidia-smi"
nvidia-smi >>"$log" 2>&1 || echo "(nvidia-smi failed)" >>"$log"
commit=${BENCH_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo "unknown (no git; set BENCH_GIT_COMMIT)")}
if git rev-parse HEAD >/dev/null 2>&1 && [[ -n $(git status --porcelain --untracked-files=no 2>/dev/null) ]]; then
    commit="$commit (with uncommitted changes)"
fi
say "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
"$PY" -c '
import platform, torch, triton
p = torch.cuda.get_device_properties(0)
print(f"gpu: {p.name}, capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
      f"{p.total_memory / 2**30:.0f} GiB")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
      f"python {platform.python_version()}")
' 2>&1 | tee -a "$summary" "$log"
say "commit: $commit"
nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | sed 's/^/driver: /' | tee -a "$summary" "$log"

if ((sweeps)); then
    step "bench.backward" "$BACKWARD_S" "$PY" -m bench.backward --out "$out/backward"
    grep -E "^(two kernels / fused|fastest): " "$out/backward/backward.md" 2>/dev/null | sed 's/^/  /' | tee -a "$summary"
    step "bench.tiles" "$TILES_S" "$PY" -m bench.tiles --budget-s $((TILES_S - 50)) --out "$out/tiles"
    grep -E "^best: " "$out/tiles/tiles.md" 2>/dev/null | sed 's/^/  /' | tee -a "$summary"
    step "bench --host" "$HOST_S" "$PY" -m bench --host --out "$out/host"
    grep -E "^goals: " "$log" | tail -1 | sed 's/^/  /' | tee -a "$summary"
    say "total: $((SECONDS - start)) s"
    exit $failed
fi

# 2. The compile check for this GPU (its JSON is left in a temporary folder: the same run on a
#    CPU machine reproduces it; the table is in session.log, the verdict in summary.txt).
tmp=$(mktemp -d)
step "compile check (sm_$cap)" "$COMPILE_S" "$PY" -m bench.compile --target "$cap" --jobs 8 --all --out "$tmp"
grep -E "^sm_[0-9a]+: |^(PASSED|FAILED): " "$log" | tail -2 | sed 's/^/  /' | tee -a "$summary"
rm -rf "$tmp"

# 3. The whole test suite, compiled.
pytest_start=$(wc -l <"$log")
pytest_args=(-p no:cacheprovider)
"$PY" -c "import xdist" 2>/dev/null && pytest_args+=(-n 8)
"$PY" -c "import pytest_timeout" 2>/dev/null && pytest_args+=(--timeout 120)
step "pytest" "$PYTEST_S" "$PY" -m pytest "${pytest_args[@]}"
closing=$(tail -n +"$((pytest_start + 1))" "$log" | grep -E "^=+ .*(passed|failed|error|no tests ran).* =+$" | tail -1)
say "pytest closing line: ${closing:-(none: see session.log)}"

# 4. The quick benchmark.
step "bench --quick" "$BENCH_S" "$PY" -m bench --quick --no-progress --out "$out/bench"

say "total: $((SECONDS - start)) s"
files=$(find "$out" -type f | wc -l)
if ((files > 8)); then
    say "warning: $files files in $out, more than the 8 planned"
fi
exit $failed
