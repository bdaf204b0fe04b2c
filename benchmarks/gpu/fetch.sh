#!/usr/bin/env bash
# Here (a machine with a package registry): fill .gpu/ (git-ignored) with what the lent GPU machine lacks, split
# over three device calls: each call carries the working tree (about 17 MiB) and at most 64 MiB in all, and
# SimpleITK's wheel alone is 50 MiB, so it travels in two parts.
#   .gpu/1  the first part of SimpleITK's wheel                                  call 1: install.sh .gpu/1
#   .gpu/2  its second part; monai, nibabel, pydicom, pylibjpeg(-openjpeg), highdicom, pydantic (13 MiB), and
#           fastapi, uvicorn, httpx, prometheus_client with their dependencies (3 MiB)
#                                                                                call 2: install.sh .gpu/2
#   .gpu/3  nvImageCodec + nvJPEG2000 (28 MiB); cache/, the TotalSegmentator sample the benchmarks read (13 MiB)
#                                                                                call 3: run.sh (installs, runs)
# Make each call within 30 s of the last (the machine stays warm that long; /tmp/site lives on it). The GPU machine
# has torch (cu130), numpy, scipy, click, pyyaml, tqdm, pillow, matplotlib, safetensors, onnx and onnxruntime (CPU);
# its Python is 3.12. Versions are this environment's (pip show), so results compare with this machine's.
# Usage (from the project root, with the dev environment active): bash benchmarks/gpu/fetch.sh
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.gpu/' >> .git/info/exclude; }
rm -rf .gpu && mkdir -p .gpu/1 .gpu/2 .gpu/3 .gpu/whole
version() { python3 -m pip show "$1" 2>/dev/null | awk '/^Version:/{print $2}'; }
pinned() { for name in "$@"; do echo "$name==$(version "$name")"; done; }
download() {  # folder, then NAME==VERSION ...
  local folder=$1; shift
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$folder" "$@" 2>&1 | grep -v '^WARNING' || true
}
download .gpu/whole "$(pinned SimpleITK)"
wheel=$(ls .gpu/whole/*.whl)
split -b 32M --numeric-suffixes "$wheel" ".gpu/whole/$(basename "$wheel").part-"
ls .gpu/whole/*.part-* | wc -l > .gpu/1/parts.count
mv .gpu/whole/*.part-00 .gpu/1/ && mv .gpu/whole/*.part-* .gpu/2/
sha256sum "$wheel" | awk -v n="$(basename "$wheel")" '{print $1 "  " n}' > .gpu/1/parts.sha256
rm -rf .gpu/whole
download .gpu/2 $(pinned monai nibabel pydicom pylibjpeg pylibjpeg-openjpeg highdicom pydantic pydantic_core \
  annotated-types typing-inspection)
# ctzoo serve and benchmarks/serve.py (3 MiB): the service, its client and its metrics
download .gpu/2 $(pinned fastapi starlette annotated-doc anyio idna uvicorn h11 httpx httpcore certifi \
  prometheus_client opentelemetry-api)
download .gpu/3 nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-nvjpeg2k-cu13==0.11.0.51
python3 - <<'PY'
import shutil
from ctzoo.datasets.samples import cache_dir, fetch_samples
fetch_samples()
shutil.copytree(cache_dir() / "samples", ".gpu/3/cache/samples", dirs_exist_ok=True)
PY
du -sh .gpu/1 .gpu/2 .gpu/3
