#!/usr/bin/env bash
# Prepares .device/ (git-ignored) for scripts/device-check.sh: the stripped release `lora` binary
# and the integration-test binary, built with the `cuda` feature, packed with xz (candle's PTX
# compresses well, and the GPU machine receives at most 64 MiB), and the wheels the GPU machine
# lacks (diffusers, for the reference step and the random SD 1.5 model).
#
#   scripts/device-prepare.sh          # CUDA build (scripts/cuda-toolkit.sh installs the toolkit)
#   scripts/device-prepare.sh --cpu    # CPU build, for `scripts/device-check.sh --cpu-dry-run` here
#
# Then, through the device tool: `bash scripts/device-check.sh` with carry [".device"].
set -euo pipefail
cd "$(dirname "$0")/.."
mode=cuda
[ "${1:-}" = "--cpu" ] && mode=cpu
features=()
if [ "$mode" = cuda ]; then
  eval "$(scripts/cuda-toolkit.sh)"
  features=(--features cuda)
fi
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
log() { echo "device-prepare: $*" >&2; }

# The lora binary with whole-program LTO ([profile.dist]): it drops the parts of candle lora does
# not use (the GGUF/MoE CUDA kernels alone are 33 MB) and keeps the stripped CUDA binary < 60 MiB.
log "building lora ($mode, dist profile)"
cargo build --profile dist "${features[@]}"
# The tests in the same profile: building them in `release` would also rebuild (and replace)
# target/release/lora with the CUDA binary, which does not start without libcuda.so.1.
log "building the integration tests ($mode, dist profile)"
tests_bin=$(cargo test --profile dist "${features[@]}" --test tests --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "tests" and m.get("executable"):
        print(m["executable"])' | tail -1)
[ -n "$tests_bin" ] || { log "could not find the test binary"; exit 1; }

rm -rf .device/bin && mkdir -p .device/bin .device/wheels
cp "$CARGO_TARGET_DIR/dist/lora" .device/bin/lora
cp "$tests_bin" .device/bin/tests
strip .device/bin/lora .device/bin/tests
size_mib=$(( $(stat -c %s .device/bin/lora) / 1048576 ))
log "stripped lora binary: ${size_mib} MiB (limit 60 MiB)"
[ "$size_mib" -lt 60 ] || { log "the lora binary is over 60 MiB"; exit 1; }
echo "$mode" >.device/bin/MODE
tar -C .device -cJf .device/bin.tar.xz bin
rm -rf .device/bin

# diffusers (not installed on the GPU machine) and what it needs that torch's image lacks.
if ! ls .device/wheels/diffusers-*.whl >/dev/null 2>&1; then
  python3 -m pip download -q --no-deps --only-binary=:all: -d .device/wheels diffusers==0.42.1 importlib_metadata zipp >&2
fi
du -sh .device >&2
ls -la .device .device/wheels >&2
