#!/usr/bin/env bash
# Packs Ray (and its few needs missing on the GPU machine) into one xz tarball small enough to carry there.
# Usage (from the project root):  bench/pack_ray_for_device.sh .device   (.device/ is git-ignored)
# On the GPU machine, start the command with:
#   mkdir -p /tmp/site && tar xJf .device/ray-cp312.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site:$PYTHONPATH;
# and name `.device` in the call's carry list. The GPU machine runs Python 3.12, so everything here is cp312.
set -euo pipefail
dest=${1:?usage: bench/pack_ray_for_device.sh DEST_DIR}
ray_version=${RAY_VERSION:-2.58.0}
mkdir -p "$dest"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
plat=(--python-version 3.12 --implementation cp --only-binary=:all:
      --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
# Ray itself plus what the GPU image lacks (checked 2026-11-25): jsonschema & friends, pydantic, tensorboardX.
pkgs=("ray==$ray_version" jsonschema jsonschema-specifications referencing rpds-py attrs
      pydantic pydantic-core annotated-types typing-inspection tensorboardX ${EXTRA_PACKAGES:-})
python3 -m pip download -q --no-deps "${plat[@]}" -d "$work/whl" "${pkgs[@]}"
python3 -m pip install -q --no-deps --no-compile "${plat[@]}" --target "$work/site" "$work"/whl/*.whl
# Parts a training job never imports: Java jars, RLlib, Serve, the dashboard's web client.
rm -rf "$work/site/ray/jars" "$work/site/ray/rllib" "$work/site/ray/serve" "$work/site/ray/dashboard/client/build"
find "$work/site" -name __pycache__ -prune -exec rm -rf {} +
tar cf - -C "$work/site" . | xz -T0 -6 > "$dest/ray-cp312.tar.xz"
ls -la "$dest/ray-cp312.tar.xz"
