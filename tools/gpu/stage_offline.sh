#!/usr/bin/env bash
# Stage the wheels a GPU machine without a network needs for mt's GPU figures (torchao, Liger,
# fire, termcolor; flash-attn-4 with its CUDA 13 runtime), in two halves that each fit one call
# of the device tool (64 MiB with the working tree), under .gpu/ (add `/.gpu/` to
# .git/info/exclude). The runtime's 92 MB wheel goes as an xz archive split in two.
#
#   bash tools/gpu/stage_offline.sh          # about 7 minutes on 2 cores (xz -9)
#
# Call 1 carries .gpu/pa and .gpu/w1:   mkdir -p /tmp/stage && cp -r .gpu/pa/part.00 .gpu/w1 /tmp/stage/
# Call 2, on the still-warm machine, carries .gpu/pb, .gpu/w2 and .gpu/env.sh:
#   source .gpu/env.sh && python3 tools/bench/float8_speed.py --shape llama-3.1-8b --out /tmp/f8
# env.sh unpacks everything into /tmp/fa4 and /tmp/site once, and sets PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=.gpu
rm -rf "$out/dl" "$out/pa" "$out/pb" "$out/w1" "$out/w2" "$out/cu13"
mkdir -p "$out/dl" "$out/pa" "$out/pb" "$out/w1" "$out/w2" "$out/cu13"

# the GPU machine's Python (3.12, x86-64 Linux), not this one's
platform=(--only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64
          --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any --no-deps)
python3 -m pip download -q "${platform[@]}" -d "$out/w1" \
    liger-kernel==0.8.5 fire termcolor torchao==0.18.0
python3 -m pip download -q "${platform[@]}" --pre -d "$out/w2" \
    flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
    nvidia-cutlass-dsl-libs-core==4.8.1 quack-kernels==0.6.5 apache-tvm-ffi==0.1.15.post2 \
    torch-c-dlpack-ext==0.1.5 cuda-bindings==13.4.4
python3 -m pip download -q "${platform[@]}" -d "$out/dl" nvidia-cutlass-dsl-libs-cu13==4.8.1

# the runtime: unzipped, xz-compressed (62 of 92 MB), cut at 40 MiB
python3 -m zipfile -e "$out"/dl/nvidia_cutlass_dsl_libs_cu13-*.whl "$out/cu13"
tar -C "$out/cu13" -cf - . | xz -9 -T2 > "$out/cu13.tar.xz"
(cd "$out" && split -b 40M -d cu13.tar.xz part.)
mv "$out/part.00" "$out/pa/" && mv "$out/part.01" "$out/pb/"
sha256sum "$out/cu13.tar.xz" | sed "s# .*# /tmp/cu13.tar.xz#" > "$out/pb/cu13.sha256"
rm -rf "$out/cu13" "$out/dl" "$out/cu13.tar.xz"

cat > "$out/env.sh" <<'EOF'
# Sourced on the GPU machine from the repository root (tools/gpu/stage_offline.sh).
if [ ! -d /tmp/fa4/nvidia_cutlass_dsl ]; then
  cat /tmp/stage/part.00 .gpu/pb/part.01 > /tmp/cu13.tar.xz
  sha256sum -c .gpu/pb/cu13.sha256 || return 1
  mkdir -p /tmp/fa4 && tar -xJf /tmp/cu13.tar.xz -C /tmp/fa4
  # pip --target does not merge into a package folder that exists: install beside, then copy
  python3 -m pip install -q --no-index --no-deps --target /tmp/fa4b .gpu/w2/*.whl
  cp -a /tmp/fa4b/. /tmp/fa4/
  python3 -m pip install -q --no-index --no-deps --target /tmp/site /tmp/stage/w1/*.whl
fi
# the .pth file that adds dsl_packages is not read from PYTHONPATH
export PYTHONPATH=/tmp/fa4:/tmp/fa4/nvidia_cutlass_dsl/dsl_packages:/tmp/site:$(ls -d $PWD/packages/*/src $PWD/apps/*/src | tr '\n' ':')
EOF
du -sh "$out"/pa "$out"/pb "$out"/w1 "$out"/w2
