#!/usr/bin/env bash
# There (the lent GPU machine), in the third call, with .gpu/3 carried: install the last wheels, then run the
# GPU checks of issue 28 in order, each under its own time limit, each writing its JSON to $OUT as it ends, so a
# step that runs out of time costs only itself. Steps: names from the list below, or the default list, which
# measures what the "done when" asks first (at most 9 minutes; a device call allows 10, and the session's
# 15 minutes of device time may allow no second call):
#   check      the GPU, the packages, tests/test_nvimgcodec_decode.py, test_preprocess_on_model.py and the CUDA
#              graphs test (on cuda)
#   infer-j2k  benchmarks/infer.py --device cuda --input j2k --decode nvimgcodec (end to end vs the bounds)
#   infer-dcm  benchmarks/infer.py --device cuda --input dicom      (the same on uncompressed DICOM)
#   train      benchmarks/train.py --device cuda with configs/recistnet_mini_gpu.yaml
#   train-r34  the same with configs/recistnet_resnet34_gpu.yaml
#   serve      benchmarks/serve.py --backend torch --device cuda    (batching on/off at concurrency 1/8/32, whole
#              512 px slices)
# A second call, where device time is left: run.sh decode infer-j2k-model precision
#   decode     benchmarks/dicom_read.py --nvimgcodec cpu,cuda      (reading: GDCM threads vs nvImageCodec)
#   infer-j2k-model  infer-j2k with --preprocess-on model (the inputs computed on the GPU)
#   precision  benchmarks/precision.py --device cuda               (bf16, torch.compile, CUDA graphs)
# Usage: bash benchmarks/gpu/run.sh [STEP ...]
set -uo pipefail
OUT=${OUT:-/tmp/ctzoo-gpu-out}
mkdir -p "$OUT"
[ -d .gpu/3 ] && { bash benchmarks/gpu/install.sh .gpu/3 >/dev/null || exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 CTZOO_CACHE=$PWD/.gpu/3/cache
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(check infer-j2k infer-dcm train train-r34 serve)
step() {  # name, seconds, command ...
  local name=$1 limit=$2; shift 2
  echo "== $name (at most ${limit} s): $*"
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "   rc=$? in $((SECONDS - start)) s; last lines:"; tail -n 8 "$OUT/$name.log" | sed 's/^/   /'
}
for s in "${steps[@]}"; do
  case $s in
    check) step check 90 bash -c "nvidia-smi -L; python3 -c 'import torch, monai, SimpleITK, pydicom, nvidia.nvimgcodec; print(torch.cuda.get_device_name(0))' && python3 -m pytest -q -n 0 -p no:cacheprovider tests/test_nvimgcodec_decode.py tests/test_preprocess_on_model.py tests/test_precision.py::test_cuda_graphs_equal_eager_on_the_gpu_for_a_smaller_last_batch_too -k 'not infer_with'" ;;
    decode) step decode 60 python3 benchmarks/dicom_read.py --nvimgcodec cpu,cuda --out "$OUT/dicom_read-gpu.json" ;;
    precision) step precision 180 python3 benchmarks/precision.py --device cuda --out "$OUT/precision-gpu.json" ;;
    infer-j2k) step infer-j2k 120 python3 benchmarks/infer.py --device cuda --backends torch --input j2k --decode nvimgcodec --repeats 2 --out "$OUT/infer-gpu-j2k.json" ;;
    infer-j2k-model) step infer-j2k-model 120 python3 benchmarks/infer.py --device cuda --backends torch --input j2k --decode nvimgcodec --preprocess-on model --repeats 2 --out "$OUT/infer-gpu-j2k-model.json" ;;
    infer-dcm) step infer-dcm 80 python3 benchmarks/infer.py --device cuda --backends torch --input dicom --repeats 2 --out "$OUT/infer-gpu-dicom.json" ;;
    train) step train 70 python3 benchmarks/train.py --rounds 1 --device cuda --config configs/recistnet_mini_gpu.yaml --out "$OUT/train-gpu.json" ;;
    serve) step serve 130 python3 benchmarks/serve.py --backend torch --device cuda --precision fp32 --crop 0 --requests 128 --target-ratio 2 --min-s 0.5 --out "$OUT/serve-gpu.json" ;;
    train-r34) step train-r34 70 python3 benchmarks/train.py --rounds 1 --device cuda --config configs/recistnet_resnet34_gpu.yaml --out "$OUT/train-gpu-r34.json" ;;
    *) echo "unknown step $s"; exit 2 ;;
  esac
done
ls -la "$OUT"
