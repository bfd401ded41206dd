#!/usr/bin/env bash
# One command for a fresh GPU machine (one A100 / H100 / H200, this repository checked out, no network):
#
#     bash bench/gpu_check.sh OUTDIR            # the real run, <= NMKERN_GPU_CHECK_SECONDS (default 540 s)
#     bash bench/gpu_check.sh OUTDIR --dry-run  # the same plumbing on a machine without a GPU
#
# Steps, in order, each under `timeout` with what is left of the budget (a step that no longer
# fits is skipped, and the run ends with what it has):
#   1 env       nvidia-smi, nvcc, torch / CUDA / cuSPARSELt, CuPy (+ NVRTC), Triton     -> env.txt
#   2 install   pip install --no-build-isolation --no-deps --no-index -e .  (nvcc builds the
#               fatbin here, CPU libraries skipped; if pip cannot, setup.build_cuda writes the
#               fatbin into nmkern/_lib, which `python -m nmkern` from the checkout uses) -> build.log
#   3 selftest  nmkern selftest --json (full when >= 360 s are left, else --quick)        -> selftest.json
#   4 gpu_tests pytest -m gpu tests/ (tests/test_cuda_gpu.py first)                       -> gpu_tests.xml
#   5 llama     bench/llama_dispatch.py: dense vs cuda vs cusparselt vs triton vs auto per M
#                                                                                         -> llama_dispatch.json
#   6 tune      nmkern tune, when that command exists (it does not yet: reported as skipped)
#   7 bench     pytest bench/bench_cuda.py --benchmark-only, gets the rest of the time  -> bench_cuda.json
#   8 summary   the answers, printed last                                                 -> summary.md
# Every command's output goes to run.log (the build's to build.log): at most 8 files in OUTDIR.
# --dry-run: env as is; install prints what it would run and checks nvcc + the mma.sp variant
# choice; selftest --quick; gpu tests of tests/test_cuda_gpu.py (they skip on a CPU); llama on
# tiny shapes on the CPU; tune printed only; bench_cuda as is (the module skips without a GPU).
# Exit status: 0 when no step failed (skipped / timed-out steps are listed in the summary), 1 when
# one failed, 2 on bad usage. PYTHON picks the interpreter (default: python3 / python on PATH).

set -u -o pipefail

usage() { echo "usage: bash bench/gpu_check.sh OUTDIR [--dry-run]" >&2; exit 2; }
OUT="" DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) usage ;;
    *) [ -z "$OUT" ] || usage; OUT=$arg ;;
  esac
done
[ -n "$OUT" ] || usage
case "${NMKERN_GPU_CHECK_SECONDS:-540}" in ''|*[!0-9]*) echo "NMKERN_GPU_CHECK_SECONDS must be whole seconds" >&2; exit 2 ;; esac

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
cd "$REPO" || exit 2
PY=${PYTHON:-$(command -v python3 || command -v python)}
TOTAL=${NMKERN_GPU_CHECK_SECONDS:-540}
RESERVE=8  # seconds kept for the summary
START=$(date +%s)
LOG=$OUT/run.log
rm -f "$OUT"/{env.txt,build.log,selftest.json,gpu_tests.xml,bench_cuda.json,llama_dispatch.json,summary.md,run.log}
STEPS=()  # "name<TAB>status<TAB>seconds<TAB>note"
# pytest with SIGINT restored: background jobs of a non-interactive shell start with SIGINT ignored,
# and `timeout -s INT` must reach pytest so that it ends the session and still writes its XML / JSON.
PYTEST=("$PY" -c 'import signal, sys, pytest; signal.signal(signal.SIGINT, signal.default_int_handler); sys.exit(pytest.main(sys.argv[1:]))')

elapsed() { echo $(( $(date +%s) - START )); }
say() { printf '[%4ss] %s\n' "$(elapsed)" "$*" | tee -a "$LOG"; }
record() { STEPS+=("$1"$'\t'"$2"$'\t'"$3"$'\t'"${4:-}"); say "$1: $2 (${3} s)${4:+ - $4}"; }
# limit CAP: seconds the next step may take: CAP, or what is left of the budget when that is less.
limit() { local left=$(( TOTAL - $(elapsed) - RESERVE )); echo $(( left < $1 ? left : $1 )); }

# step NAME LIMIT MIN CMD...: run CMD under `timeout LIMIT` (SIGINT, then KILL 15 s later), output to
# $STEP_LOG (default run.log); skip it when LIMIT < MIN. Sets RC (124: timed out, 125: skipped;
# 5 is pytest's "no test ran", e.g. bench_cuda.py skipping itself without a GPU: not a failure).
step() {
  local name=$1 lim=$2 min=$3 dest=${STEP_LOG:-$LOG}; shift 3
  if (( lim < min )); then RC=125; record "$name" SKIPPED 0 "${lim} s left, needs >= ${min} s"; return; fi
  say "$name: running (limit ${lim} s): $*"
  [ "$dest" = "$LOG" ] || echo "== $name: $*" >>"$dest"
  local t0; t0=$(date +%s)
  timeout -s INT -k 15 "$lim" "$@" >>"$dest" 2>&1; RC=$?
  local dt=$(( $(date +%s) - t0 )) st
  case $RC in 0) st=ok ;; 124|137) st=TIMEOUT ;; 5) st="EMPTY(no test ran)" ;; *) st="FAIL(rc=$RC)" ;; esac
  record "$name" "$st" "$dt" "${NOTE:-}"
}

has_command() { "$PY" -m nmkern "$1" --help >/dev/null 2>&1; }

# ---- 1 env ---------------------------------------------------------------------------------------
env_report() {
  echo "date: $(date -u +%FT%TZ)  host: $(hostname)  mode: $([ $DRY = 1 ] && echo dry-run || echo real)"
  echo "budget_s: $TOTAL  repo: $REPO  commit: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo "python: $PY"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader 2>&1 | sed 's/^/nvidia-smi: /'
  else echo "nvidia-smi: not found"; fi
  echo "nvcc: $( (nvcc --version 2>/dev/null || "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" --version 2>/dev/null) | grep -o 'release [0-9.]*' || echo 'not found')"
  "$PY" - <<'PY'
import importlib, os
def line(k, f):
    try:
        v = f()
    except Exception as e:
        v = f"no ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    print(f"{k}: {v}")
import torch
line("torch", lambda: f"{torch.__version__} (CUDA {torch.version.cuda})")
line("gpu", lambda: f"{torch.cuda.get_device_name()} sm_{''.join(map(str, torch.cuda.get_device_capability()))}"
     if torch.cuda.is_available() else "none (torch.cuda.is_available() is False)")
line("cusparselt", lambda: f"{torch.backends.cusparselt.is_available()} (version {torch.backends.cusparselt.version()})")
line("triton", lambda: importlib.import_module("triton").__version__)
line("cupy", lambda: importlib.import_module("cupy").__version__)
line("nvrtc", lambda: importlib.import_module("cupy").cuda.nvrtc.getVersion())
line("nmkern", lambda: importlib.import_module("nmkern").__version__)
line("fatbin", lambda: os.path.getsize("nmkern/_lib/nmkern_cuda.fatbin"))
line("cuda_backend_available", lambda: importlib.import_module("nmkern._cuda").available())
PY
}
t0=$(date +%s)
env_report >"$OUT/env.txt" 2>&1
record env ok $(( $(date +%s) - t0 )) "$(grep -m1 '^gpu:' "$OUT/env.txt" | cut -c6-)"

# ---- 2 install -----------------------------------------------------------------------------------
# NMKERN_SKIP_CPU_BUILD=1: the CPU libraries are not what this run checks (and take the longest to build).
PIP=(env NMKERN_SKIP_CPU_BUILD=1 "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e .)
if [ $DRY = 1 ]; then
  t0=$(date +%s)
  {
    echo "DRY RUN: would run: ${PIP[*]}"
    echo "nvcc and the mma.sp variant setup.py would pick:"
    "$PY" - <<'PY'
import importlib.util, shutil
spec = importlib.util.spec_from_file_location("nmkern_setup", "setup.py")
setup = importlib.util.module_from_spec(spec)
spec.loader.exec_module(setup)  # setup() runs only under __main__
nvcc = shutil.which("nvcc")
print("nvcc:", nvcc, "flags:", setup.sparse_mma_flags(nvcc) if nvcc else "(no nvcc: no fatbin would be built)")
PY
  } >"$OUT/build.log" 2>&1
  RC=$?
  record install "$([ $RC = 0 ] && echo dry || echo "FAIL(rc=$RC)")" $(( $(date +%s) - t0 )) "printed, not run"
else
  NOTE="" STEP_LOG=$OUT/build.log step install "$(limit 240)" 30 "${PIP[@]}"
  if [ "$RC" != 0 ] && [ "$RC" != 125 ]; then  # pip could not (old setuptools, no wheel): build the fatbin in place
    STEP_LOG=$OUT/build.log step install_fallback "$(limit 180)" 30 "$PY" -c \
      'import importlib.util, pathlib; s = importlib.util.spec_from_file_location("nmkern_setup", "setup.py"); m = importlib.util.module_from_spec(s); s.loader.exec_module(m); m.build_cuda(pathlib.Path("nmkern/_lib"))'
  fi
  say "install: $(grep -o 'NMKERN_SP_ORDERED_METADATA=[01]' "$OUT/build.log" | tail -1); fatbin: $(ls -l nmkern/_lib/nmkern_cuda.fatbin 2>&1)"
fi

# ---- 3 selftest ----------------------------------------------------------------------------------
if has_command selftest; then
  lim=$(limit 150)
  mode=(--quick); [ $DRY = 0 ] && (( lim >= 150 && $(limit 100000) >= 360 )) && mode=()
  NOTE="${mode[*]:-full}" step selftest "$lim" 20 "$PY" -m nmkern selftest "${mode[@]}" --json "$OUT/selftest.json"
else
  record selftest MISSING 0 "'nmkern selftest' does not exist in this checkout"
fi

# ---- 4 gpu tests ---------------------------------------------------------------------------------
if [ $DRY = 1 ]; then tests=(tests/test_cuda_gpu.py); else tests=(tests/test_cuda_gpu.py tests/); fi
NOTE="${tests[*]}" step gpu_tests "$(limit 150)" 20 "${PYTEST[@]}" -q -p no:cacheprovider -m gpu "${tests[@]}" \
  --junitxml "$OUT/gpu_tests.xml"

# ---- 5 llama dispatch ----------------------------------------------------------------------------
lim=$(limit 120)
if [ $DRY = 1 ]; then args=(--tiny --device cpu --seconds 0.1); else args=(); fi
NOTE="" step llama "$lim" 30 "$PY" bench/llama_dispatch.py --out "$OUT/llama_dispatch.json" \
  --budget $(( lim > 40 ? lim - 20 : lim / 2 )) "${args[@]}"

# ---- 6 tune --------------------------------------------------------------------------------------
if ! has_command tune; then
  record tune SKIPPED 0 "'nmkern tune' (measured dispatch) does not exist yet"
elif [ $DRY = 1 ]; then
  record tune dry 0 "would run: $PY -m nmkern tune"
else
  NOTE="output in run.log" step tune "$(limit 60)" 20 "$PY" -m nmkern tune
fi

# ---- 7 bench_cuda --------------------------------------------------------------------------------
NOTE="" step bench_cuda "$(limit 100000)" 30 "${PYTEST[@]}" -q -p no:cacheprovider bench/bench_cuda.py \
  --benchmark-only --benchmark-json "$OUT/bench_cuda.json"

# ---- 8 summary -----------------------------------------------------------------------------------
"$PY" - "$OUT" "$DRY" "$(elapsed)" "$TOTAL" "${STEPS[@]}" >"$OUT/summary.md" 2>>"$LOG" <<'PY'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path

out, dry, elapsed, total, steps = Path(sys.argv[1]), sys.argv[2] == "1", sys.argv[3], sys.argv[4], sys.argv[5:]
env = dict(l.split(": ", 1) for l in (out / "env.txt").read_text().splitlines() if ": " in l) if (out / "env.txt").exists() else {}
P = print
P(f"# nmkern GPU check ({'DRY RUN, no GPU used' if dry else 'real run'})\n")
P(f"GPU: {env.get('gpu', '?')}; torch {env.get('torch', '?')}; cuSPARSELt {env.get('cusparselt', '?')}; "
  f"CuPy {env.get('cupy', '?')}; Triton {env.get('triton', '?')}; nvcc {env.get('nvcc', '?')}. "
  f"{elapsed} s of a {total} s budget.\n")
P("| step | status | s | note |\n|---|---|---|---|")
for s in steps:
    name, status, secs, note = (s.split("\t") + ["", "", "", ""])[:4]
    P(f"| {name} | {status} | {secs} | {note.replace('|', '/')} |")


def load(name):
    try:
        return json.loads((out / name).read_text())
    except Exception as e:
        return None


P("\n## 1. Does the mma.sp metadata placement work? (nmkern cuda backend correct on this GPU)\n")
st = load("selftest.json")
selftest_cuda_bad = False
if isinstance(st, dict):
    checks = st.get("checks", st.get("results", []))
    items = checks.items() if isinstance(checks, dict) else ((c.get("name", "?"), c) for c in checks if isinstance(c, dict))
    rows = [(n, c.get("status", c.get("ok", c.get("passed", "?"))) if isinstance(c, dict) else c) for n, c in items]
    P(f"- selftest: {len(rows)} checks: " + ", ".join(f"{v}: {sum(1 for _, x in rows if str(x) == v)}"
                                                     for v in sorted({str(x) for _, x in rows})))
    for n, v in rows:
        if "cuda" in n.lower() or "mma" in n.lower():
            P(f"  - {n}: {v}")
            selftest_cuda_bad |= str(v).lower() in ("fail", "failed", "false", "error")
else:
    P("- selftest: no selftest.json (see the steps above)")
try:
    root = ET.parse(out / "gpu_tests.xml").getroot()
    by = {}
    for case in root.iter("testcase"):
        mod = case.get("classname", "?").rsplit(".", 1)[-1] if "test_cuda_gpu" not in case.get("classname", "") else "test_cuda_gpu"
        kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        by.setdefault(mod, {}).setdefault(kind, 0)
        by[mod][kind] += 1
    cg = by.get("test_cuda_gpu", {})
    P(f"- tests/test_cuda_gpu.py: {cg or 'not collected'}; all -m gpu tests: "
      + str({k: sum(d.get(k, 0) for d in by.values()) for k in ('passed', 'failure', 'error', 'skipped')}))
    failing = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase") if c.find("failure") is not None or c.find("error") is not None]
    for f in failing[:10]:
        P(f"  - FAILED {f}")
except Exception as e:
    cg = {}
    P(f"- gpu tests: no readable gpu_tests.xml ({type(e).__name__})")
ld = load("llama_dispatch.json") or {}
cuda_check = ld.get("checks", {}).get("cuda")
P(f"- llama_dispatch check of the cuda path vs float64: {cuda_check or ld.get('skipped', {}).get('cuda', 'not run')[:200]}")
if cg.get("passed") and not selftest_cuda_bad and not cg.get("failure") and not cg.get("error") and (cuda_check or {}).get("ok", True):
    P("- **verdict: yes** - the CUDA 2:4 kernel matched the float64 reference in every test that ran")
elif cg.get("failure") or cg.get("error") or (cuda_check and not cuda_check.get("ok")) or selftest_cuda_bad:
    P("- **verdict: NO** - at least one CUDA kernel check failed (details above and in run.log)")
else:
    P("- **verdict: not tested** - no CUDA kernel test ran here")

P("\n## 2. cuSPARSELt vs nmkern cuda vs Triton by M (bench/bench_cuda.py, warm median ms per call)\n")
bench = load("bench_cuda.json")
if bench and bench.get("benchmarks"):
    cells = {}
    for b in bench["benchmarks"]:
        p, info = b.get("params", {}), b.get("extra_info", {})
        cells.setdefault((p.get("shape"), p.get("m")), {})[p.get("impl")] = info.get("cuda_ms")
    impls = ("dense_cublas", "cusparselt", "nmkern_cuda", "nmkern_triton")
    P("| shape | M | " + " | ".join(impls) + " | fastest |\n|---|---|" + "---|" * (len(impls) + 1))
    for (shape, m), d in sorted(cells.items(), key=lambda kv: (str(kv[0][0]), kv[0][1] or 0)):
        got = {k: v for k, v in d.items() if v is not None}
        P(f"| {shape} | {m} | " + " | ".join(f"{d[i]:.4f}" if d.get(i) is not None else "-" for i in impls)
          + f" | {min(got, key=got.get) if got else '-'} |")
else:
    P("No benchmark results (bench_cuda.json missing or empty: no GPU, skipped, or cut by the budget).")

P("\n## 3. Dispatch table (bench/llama_dispatch.py: median ms, which path wins per M, what auto picks)\n")
rows = ld.get("rows", [])
if rows:
    paths = ["dense"] + [p for p in ("cuda", "cusparselt", "triton", "auto", "cpu") if any(f"{p}_median_ms" in r for r in rows)]
    P("| M | scope | " + " | ".join(paths) + " | winner | auto picks |\n|---|---|" + "---|" * (len(paths) + 2))
    for r in rows:
        if "winner" not in r:
            P(f"| {r.get('m')} | {r.get('scope')} | {r.get('reason', '')} |")
            continue
        auto = r.get("auto_path") or ",".join(sorted(set((r.get("auto_paths") or {}).values()))) or "-"
        P(f"| {r['m']} | {r['scope']} | " + " | ".join(f"{r[f'{p}_median_ms']:.4f}" if f"{p}_median_ms" in r else "-" for p in paths)
          + f" | {r['winner']} | {auto} |")
    for p, why in ld.get("skipped", {}).items():
        P(f"- {p} not timed: {why[:200]}")
    if ld.get("interrupted") or not ld.get("complete"):
        P("- the measurement stopped early (time budget)")
else:
    P("No dispatch measurement (llama_dispatch.json missing or empty).")
P("\nFiles: " + ", ".join(sorted(p.name for p in out.iterdir())) + ". Full output: run.log, build.log.")
PY
record summary "$([ $? = 0 ] && echo ok || echo FAIL)" 0 "summary.md"
echo
cat "$OUT/summary.md"
for s in "${STEPS[@]}"; do
  case "$(printf '%s' "$s" | cut -f2)" in FAIL*|MISSING) exit 1 ;; esac
done
exit 0
