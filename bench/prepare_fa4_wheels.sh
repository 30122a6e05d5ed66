#!/usr/bin/env bash
# Run HERE (not on the GPU machine): download flash-attn-4 and its CuTe-DSL runtime as cp312 wheels for the
# device tool, which carries at most 64 MiB per call and has no network. The 92 MB
# nvidia-cutlass-dsl-libs-cu13 wheel is split in two: part .aa goes to .fa4a/, part .ab and the small wheels
# to .fa4b/. On the device, one call copies .fa4a/* to /tmp/fa4stash (carry .fa4a), the next (within the
# 30 s idle window, carry .fa4b) runs `source bench/fa4_env.sh /tmp/fa4stash .fa4b`.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.fa4a/' .git/info/exclude || printf '/.fa4a/\n/.fa4b/\n' >> .git/info/exclude
tmp=$(mktemp -d)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$tmp" \
  flash-attn-4==4.0.0b36 nvidia-cutlass-dsl-libs-base==4.8.1 nvidia-cutlass-dsl-libs-core==4.8.1 \
  nvidia-cutlass-dsl-libs-cu13==4.8.1 quack-kernels==0.6.5 apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5
# einops, cuda-bindings, protobuf and typing-extensions are already on the device image (KINDS.md).
rm -rf .fa4a .fa4b && mkdir -p .fa4a .fa4b
split -b 46000000 "$tmp"/nvidia_cutlass_dsl_libs_cu13-*.whl .fa4b/cu13.whl.part.
mv .fa4b/cu13.whl.part.aa .fa4a/
find "$tmp" -name '*.whl' ! -name 'nvidia_cutlass_dsl_libs_cu13-*' -exec mv {} .fa4b/ \;
rm -rf "$tmp"
du -sh .fa4a .fa4b
