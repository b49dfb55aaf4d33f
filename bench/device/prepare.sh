#!/usr/bin/env bash
# Prepare, on this (CPU) machine, what a lent GPU machine cannot fetch for bench/device/run.sh:
# wheels of the packages its image lacks (titans-pytorch for the peer column, gluonts, pyfaidx and their needs)
# and the benchmark data from ../shared/datasets (only the checkout travels, not ../shared).
# Everything goes to .dev/device (git-ignored); name it in the device tool's `carry`.
#
#     bash bench/device/prepare.sh
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  sed -n '2,/^set /p' "$0" | grep "^#" | cut -c3-
  exit 0
fi
set -euo pipefail
cd "$(dirname "$0")/../.."
target=.dev/device
shared=${SHARED_DATASETS:-../shared/datasets}
if [ ! -d "$shared" ]; then
  echo "error: benchmark data not found at $shared; set SHARED_DATASETS to the datasets folder" >&2
  exit 2
fi
mkdir -p "$target/whl" "$target/data"

# The GPU image has torch, triton, numpy, pandas, scikit-learn, typer, rich, safetensors, einops, sympy, tqdm and
# packaging; these are the rest, pinned to versions that install together under Python 3.12 (checked 2026-11-22).
wheels=(
  titans-pytorch==0.5.5 assoc-scan==0.0.6 accelerated-scan==0.3.1 axial-positional-embedding==0.3.12
  einx==0.4.3 frozendict==2.5.1 hyper-connections==0.4.11 torch-einops-utils==0.2.0 rotary-embedding-torch==0.9.1
  tensordict==0.15.3 pyvers==0.2.3 x-transformers==2.31.10 loguru==0.7.3 einops==0.8.2
  gluonts==0.17.0 pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0 pyfaidx==0.9.2.2
)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$target/whl" "${wheels[@]}"

for path in ETTh1/ETTh1.csv.gz ETTm1/ETTm1.csv.gz weather/weather.csv.gz \
            genomic_benchmarks/sequences/human_nontata_promoters/test.csv.gz; do
  mkdir -p "$target/data/$(dirname "$path")"
  cp "$shared/$path" "$target/data/$path"
done
du -sh "$target"
