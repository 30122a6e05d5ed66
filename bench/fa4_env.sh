# Source on the GPU machine to make flash-attn-4 (`flash_attn.cute`) importable without network access:
#   source bench/fa4_env.sh DIR_A DIR_B
# The wheels travel as files in DIR_A / DIR_B (the 92 MB nvidia-cutlass-dsl-libs-cu13 wheel split in two parts,
# `cu13.whl.part.*`, because one device call carries at most 64 MiB; made by bench/prepare_fa4_wheels.sh).
# Installs once into /tmp/fa4/site-packages and puts it (and cutlass's dsl_packages, normally added by a .pth
# file) on PYTHONPATH. The folder must be named site-packages: quack (the GEMM library FA4 ships with) fingerprints
# epilogue functions for its kernel cache and treats code under site-packages/ as pinned library code; installed
# anywhere else it walks into cutlass's module globals and fails ("epilogue fn depends on <ContextVar ...>").
fa4_site=/tmp/fa4/site-packages
if [ ! -f "$fa4_site/.ok" ]; then
  rm -rf "$fa4_site"  # a failed earlier attempt: start clean (pip --target skips what is already there)
  fa4_whl=/tmp/nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl
  cat "$1"/cu13.whl.part.* "$2"/cu13.whl.part.* > "$fa4_whl" &&
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$fa4_site" \
      "$fa4_whl" "$2"/*.whl && touch "$fa4_site/.ok"
fi
export PYTHONPATH="$fa4_site:$fa4_site/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import flash_attn.cute, cutlass; print('flash_attn.cute', flash_attn.cute.__file__)"
