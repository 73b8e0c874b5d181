#!/usr/bin/env bash
# The GPU checks of issue #19 as one script: install check, export (fp32 + fp16), `pytest -m gpu`, then
# `attnserve bench engine|runtime|http --device DEVICE`. Everything it writes goes to $OUT (at most 8 files, the
# device tool's limit). It runs end to end on a CPU machine with --device cpu (GPU tests skip, short benches):
#   make gpu-check CHECK_DEVICE=cpu          # or: OUT=/tmp/gc bash bench/gpu_check.sh --device cpu --quick
#
# ON THE GPU MACHINE (to be run: nothing here has run on a GPU yet, and no GPU number exists)
# The machine reaches no registry. Its image has CUDA 13 with cuDNN 9 as nvidia-* wheels, torch, onnx,
# onnxscript, tokenizers, sacrebleu, safetensors, httpx, aiohttp, prometheus-client, pyyaml, psutil, and the CPU
# onnxruntime (which this script uninstalls there, --drop-cpu-onnxruntime: it must not sit beside
# onnxruntime-gpu). It lacks onnxruntime-gpu, ray[serve], pydantic, fastapi, uvicorn, starlette,
# python-multipart, fastapi-offline, ctranslate2: they travel as wheels. The working tree (about 54 MB with the
# checkpoints) travels with every call, so each call carries about 9 MiB more:
#   1. here, once:
#        ../shared/tools/devwheels.sh -m 9 -x 'onnxruntime-gpu==1.31.1' 'ray[serve]==2.60.0' pydantic \
#          fastapi-offline python-multipart ctranslate2
#        mkdir -p .gpudata && tar cJf .gpudata/data.tar.xz -C .. shared/data/spa-eng/spa.txt \
#          shared/data/fashion-mnist/t10k-images-idx3-ubyte.gz shared/data/fashion-mnist/t10k-labels-idx1-ubyte.gz
#        (echo /.gpudata/ >> .git/info/exclude; .devwheels/ is excluded by devwheels.sh)
#   2. one short call per part, back to back so the machine stays warm (devwheels.sh prints them):
#        run carry=[".devwheels/partNN"]  command: mkdir -p /tmp/dw && cp .devwheels/partNN /tmp/dw/
#   3. the check, one call (timeout_s 600; each phase below has its own time cap, 570 s in all):
#        run carry=[".gpudata"] timeout_s=600 command:
#          bash bench/gpu_check.sh --device cuda --drop-cpu-onnxruntime --data .gpudata/data.tar.xz
#      then give_back. Quote $OUT/summary.txt, pytest-gpu.log and the three bench-*.txt, naming the card.
#
# Options: --device cuda|cpu (default cuda); --quick (short benches, what the CPU run uses); --data TAR.XZ (the
# datasets, unpacked to a temp folder and used as ATTNSERVE_DATA); --drop-cpu-onnxruntime; --phases LIST
# (comma-separated of export,tests,engine,runtime,http; default all). Extra flags per bench: ENGINE_ARGS,
# RUNTIME_ARGS, HTTP_ARGS. A bench without a --device flag on this checkout fails its phase with a clear line
# under --device cuda (it would measure the CPU), and runs without the flag under --device cpu.
set -uo pipefail

device=cuda quick=0 data="" drop_cpu_ort=0 phases="export,tests,engine,runtime,http"
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device=$2; shift 2 ;;
    --quick) quick=1; shift ;;
    --data) data=$2; shift 2 ;;
    --drop-cpu-onnxruntime) drop_cpu_ort=1; shift ;;
    --phases) phases=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "gpu_check: unknown option $1" >&2; exit 2 ;;
  esac
done
case "$device" in cuda|cpu) ;; *) echo "gpu_check: --device must be cuda or cpu" >&2; exit 2 ;; esac
[ "$device" = cpu ] && quick=1

cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
summary="$OUT/summary.txt"
: > "$summary"
failed=0
note() { echo "$*" | tee -a "$summary"; }
want() { [[ ",$phases," == *",$1,"* ]]; }

# --- wheels carried by earlier calls (devwheels.sh -x parts in /tmp/dw, or in the tree) -------------------------
if [ ! -d /tmp/site ] && ls /tmp/dw/part* .devwheels/part* >/dev/null 2>&1; then
  mkdir -p /tmp/site
  parts=$(ls /tmp/dw/part* 2>/dev/null || ls .devwheels/part*)
  # shellcheck disable=SC2086
  cat $parts | xz -d | tar xf - -C /tmp/site || { note "FAILED: unpacking the wheel parts ($parts)"; exit 1; }
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} || export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ "$drop_cpu_ort" = 1 ] && [ -d /tmp/site/onnxruntime ]; then
  # The image's CPU onnxruntime beside the carried onnxruntime-gpu: start-up refuses that (both dists), so remove
  # it (this machine is thrown away after the session).
  "$PY" -m pip uninstall -y -q onnxruntime >/dev/null 2>&1 && note "removed the image's CPU onnxruntime"
fi
if [ -n "$data" ]; then
  d=$(mktemp -d) && tar xJf "$data" -C "$d" && export ATTNSERVE_DATA=$(ls -d "$d"/*/data)
fi
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# --- the environment, as the service sees it -----------------------------------------------------------------------
{
  date -u; uname -a; "$PY" --version
  if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  else echo "nvidia-smi: not on PATH"; fi
  "$PY" - <<'EOF'
import onnxruntime as ort
from service.runtime.sessions import installed_onnxruntimes, check_install
print("onnxruntime", ort.__version__, ort.get_available_providers(), installed_onnxruntimes())
check_install()
print("install check: ok")
EOF
} > "$OUT/env.txt" 2>&1 || { note "FAILED: environment (see env.txt)"; failed=1; }
note "device $device, quick $quick, $(grep -m1 -E '^[A-Z].*(H100|H200|GB)' "$OUT/env.txt" || echo 'no GPU listed')"

# Time caps per phase fit one 600 s device call on the GPU; a CPU run (quick) is slower and has no such limit.
scale=1; [ $quick = 1 ] && scale=4

phase() {  # phase NAME CAP_SECONDS LOG COMMAND...
  local name=$1 cap=$(($2 * scale)) log=$3; shift 3
  local t0=$SECONDS
  timeout --kill-after=10 "$cap" "$@" >> "$log" 2>&1
  local rc=$?
  note "$name: rc=$rc in $((SECONDS - t0)) s ($(basename "$log"))"
  [ $rc = 0 ] || failed=1
  return $rc
}

# --- export: fp32 + fp16 (the fp16 gate runs in tests/gpu, on the device) ------------------------------------------
if want export; then
  if [ "$device" = cuda ]; then
    phase export 150 "$OUT/export.log" "$PY" -m service.cli export --out artifacts --precision fp32,fp16 \
      --greedy-sentences 50 --quality-limit 300
  elif ls artifacts/*/*/manifest.json >/dev/null 2>&1; then
    note "export: skipped (the CPU run serves the artifacts present)"
  else
    phase export 150 "$OUT/export.log" "$PY" -m service.cli export --out artifacts
  fi
fi

# --- the gpu tests (they skip, saying why, without a working CUDA provider) ----------------------------------------
if want tests; then
  # ATTNSERVE_TEST_ARTIFACTS: the tests serve what is in artifacts/ (no second export from their fixture).
  ATTNSERVE_TEST_ARTIFACTS=$PWD/artifacts phase "pytest -m gpu" 150 "$OUT/pytest-gpu.log" "$PY" -m pytest -m gpu tests/gpu -rs -v -p no:cacheprovider \
    -o addopts="" -s
  rc=$(tail -n 3 "$OUT/pytest-gpu.log" | grep -Eo '[0-9]+ (passed|failed|skipped|error)' | tr '\n' ' ')
  note "  pytest: $rc"
fi

has_device_flag() { "$PY" -m service.cli bench "$1" --help 2>/dev/null | grep -q -- '--device'; }

bench() {  # bench NAME CAP LOG ARGS...
  local name=$1 cap=$2 log=$3; shift 3
  local flag=(--device "$device")
  if ! has_device_flag "$name"; then
    if [ "$device" = cuda ]; then
      echo "FAILED: \`attnserve bench $name\` has no --device flag on this checkout: it would measure the CPU" \
        | tee -a "$log"
      note "bench $name: FAILED (no --device flag)"; failed=1; return 1
    fi
    echo "note: \`attnserve bench $name\` has no --device flag here; it runs on the CPU, as asked" >> "$log"
    flag=()
  fi
  echo "\$ attnserve bench $name ${flag[*]} $*" >> "$log"
  phase "bench $name" "$cap" "$log" "$PY" -m service.cli bench "$name" "${flag[@]}" "$@"
}

if want engine; then
  if [ $quick = 1 ]; then args=(--rates 2 --seconds 3 --drain 30 --slots 16); else args=(--rates 32 64 128 --seconds 8 --drain 20); fi
  # shellcheck disable=SC2086
  bench engine 100 "$OUT/bench-engine.txt" "${args[@]}" ${ENGINE_ARGS:-}
fi

if want runtime; then
  if [ $quick = 1 ]; then args=(--quick --sentences 8 --no-notes --no-export); else args=(--seconds 2 --no-notes --no-export); fi
  # shellcheck disable=SC2086
  bench runtime 60 "$OUT/bench-runtime.txt" "${args[@]}" ${RUNTIME_ARGS:-}
fi

# --- bench http: against `attnserve serve --device DEVICE`, started here and stopped at the end -------------------
if want http; then
  port=$("$PY" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
  mport=$("$PY" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
  env -u RAY_AUTH_MODE -u RAY_AUTH_TOKEN -u RAY_AUTH_TOKEN_PATH "$PY" -m service.cli serve --device "$device" \
    --port "$port" --metrics-port "$mport" --admission-front none --no-export > "$OUT/serve.log" 2>&1 &
  serve_pid=$!
  t0=$SECONDS
  until grep -q "Ctrl-C to stop" "$OUT/serve.log"; do
    if ! kill -0 $serve_pid 2>/dev/null || [ $((SECONDS - t0)) -gt $((150 * scale)) ]; then break; fi
    sleep 1
  done
  if grep -q "Ctrl-C to stop" "$OUT/serve.log"; then
    note "serve --device $device: ready in $((SECONDS - t0)) s ($(grep -m1 'translator on' "$OUT/serve.log"))"
    if [ $quick = 1 ]; then args=(--concurrency 2 --seconds 3); else args=(--concurrency 1 8 32 --seconds 10); fi
    # shellcheck disable=SC2086
    bench http 120 "$OUT/bench-http.txt" --url "http://127.0.0.1:$port" \
      --metrics-url "http://127.0.0.1:$mport/metrics" "${args[@]}" ${HTTP_ARGS:-}
  else
    note "FAILED: attnserve serve --device $device did not become ready (serve.log)"; failed=1
  fi
  kill -TERM $serve_pid 2>/dev/null
  for _ in $(seq 90); do kill -0 $serve_pid 2>/dev/null || break; sleep 1; done
  kill -KILL $serve_pid 2>/dev/null
  wait $serve_pid 2>/dev/null
fi

note "gpu_check: $([ $failed = 0 ] && echo ok || echo FAILED) (files in $OUT)"
exit $failed
