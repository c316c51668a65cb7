#!/usr/bin/env bash
# Installs the CUDA 13.0 toolkit that `cargo build --features cuda` needs from PyPI wheels (nvcc,
# NVVM, the CUDA runtime/CRT/CCCL headers, NVRTC, cuBLAS, cuRAND) plus the driver stub library
# libcuda.so from Debian's libcuda1, into one folder, without root and without a GPU. Cached: a
# second run downloads nothing. Prints the environment to build with; use it as
#
#   eval "$(scripts/cuda-toolkit.sh)"          # default folder: .cuda/ in the repository
#   cargo build --release --features cuda
#
# CUDA 13.0 exactly: the GPU machine's driver is 580 (CUDA 13.0) and rejects PTX from 13.1+.
# Options: CUDA_TOOLKIT_DIR=folder, CUDA_COMPUTE_CAP (default 90, Hopper: H100/H200).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
dir=${CUDA_TOOLKIT_DIR:-$repo/.cuda}
cap=${CUDA_COMPUTE_CAP:-90}
py=${PYTHON:-python3}
mkdir -p "$dir/wheels" "$dir/root"
dir=$(cd "$dir" && pwd)
log() { echo "cuda-toolkit: $*" >&2; }

wheels=(
  "nvidia-cuda-nvcc==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cuda-crt==13.0.*"
  "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*" "nvidia-cuda-nvrtc==13.0.*"
  "nvidia-cublas==13.0.*" "nvidia-curand==10.4.0.*"
)
if [ ! -f "$dir/root/.wheels-done" ]; then
  log "downloading ${#wheels[@]} CUDA 13.0 wheels into $dir/wheels"
  "$py" -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --python-version 3.12 \
      -d "$dir/wheels" "${wheels[@]}" >&2
  for w in "$dir"/wheels/*.whl; do
    "$py" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$w" "$dir/unpacked"
  done
  # The wheels put everything under nvidia/cu13/{bin,include,lib,nvvm}; merge into one root.
  src=$(find "$dir/unpacked/nvidia" -maxdepth 1 -type d -name 'cu13' | head -1)
  [ -n "$src" ] || src="$dir/unpacked/nvidia"
  cp -a "$src"/. "$dir/root/"
  touch "$dir/root/.wheels-done"
  rm -rf "$dir/unpacked" "$dir/wheels"   # merged into root/; the marker keeps it cached
fi

# libcuda.so (the driver API) only to link against: the real one comes with the GPU's driver.
if ! ls "$dir/root/lib/libcuda.so"* >/dev/null 2>&1; then
  log "fetching libcuda.so from Debian's libcuda1 (non-free)"
  tmp=$(mktemp -d)
  # A private apt configuration with Debian's non-free component, so the system's is untouched.
  apt_dir="$dir/apt"; mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
  codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
  echo "deb http://deb.debian.org/debian $codename main non-free" >"$apt_dir/sources.list"
  apt_opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
            -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache" -o "APT::Architecture=amd64")
  apt-get "${apt_opts[@]}" -qq update >&2 || true
  (cd "$tmp" && apt-get "${apt_opts[@]}" download libcuda1 >&2) || {
    log "apt-get download libcuda1 failed (Debian's non-free component, package libcuda1, is needed for libcuda.so)"
    exit 1
  }
  dpkg -x "$tmp"/libcuda1_*.deb "$tmp/x"
  find "$tmp/x" -name 'libcuda.so*' -exec cp -a {} "$dir/root/lib/" \;
  rm -rf "$tmp"
fi

# Unversioned names for the linker (the wheels ship only libX.so.13 and the like).
lib="$dir/root/lib"
for f in "$lib"/lib*.so.*; do
  base=$(basename "$f"); stem=${base%%.so.*}
  [ -e "$lib/$stem.so" ] || ln -s "$base" "$lib/$stem.so"
done
chmod +x "$dir/root/bin/"* "$dir/root/nvvm/bin/"* 2>/dev/null || true

ver=$("$dir/root/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')
case "$ver" in 13.0) ;; *) log "nvcc reports CUDA $ver, expected 13.0"; exit 1 ;; esac
log "CUDA $ver toolkit ready in $dir/root (compute capability $cap)"
cat <<ENV
export CUDA_ROOT="$dir/root"
export CUDA_PATH="$dir/root"
export CUDA_HOME="$dir/root"
export PATH="$dir/root/bin:\$PATH"
export LIBRARY_PATH="$lib\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
export CUDA_COMPUTE_CAP=$cap
ENV
