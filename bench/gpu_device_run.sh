#!/usr/bin/env bash
# The GPU run of issue #8, for the lent GPU machine (one H100/H200, torch 2.11, no diffusers, no
# registry). About 6-8 minutes; writes $OUT/sd15/gpu.json, $OUT/sdxl/gpu.json and the logs.
#
# Before calling it (on the CPU machine, once): put the wheels it installs into .gpu-wheels/, a folder
# git ignores, and carry that folder:
#   echo /.gpu-wheels/ >> .git/info/exclude
#   .venv/bin/pip download --no-deps --only-binary=:all: --python-version 3.12 -d .gpu-wheels \
#       diffusers==0.42.1 importlib_metadata zipp
# Then: run(command="bash bench/gpu_device_run.sh", carry=[".gpu-wheels"], timeout_s=560)
set -u -o pipefail
OUT="${OUT:-./gpu-out}"
mkdir -p "$OUT/sd15" "$OUT/sdxl"
DEPS=/tmp/headshots-gpu-deps
python3 -m pip install --quiet --no-index --no-deps --target "$DEPS" .gpu-wheels/*.whl || exit 3
export PYTHONPATH="$DEPS${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import torch, diffusers, transformers, peft; print('torch', torch.__version__, 'diffusers', \
diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, torch.cuda.get_device_name())" \
  2>&1 | tee "$OUT/versions.log" || exit 4
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >> "$OUT/versions.log" 2>&1

# SD1.5 architecture: the figures (512 px, 25 steps, a person = 40 images in 2 styles).
timeout 330 python3 bench/gpu.py --model sd15 --device cuda --repeats 3 --train-procs 4 --out "$OUT/sd15" \
  > "$OUT/sd15.log" 2>&1
echo "sd15 exit $?" >> "$OUT/sd15.log"
# SDXL architecture, 1024 px: fewer images so that it fits the lease (VAE decode at 1024 px is heavy).
timeout 200 python3 bench/gpu.py --model sdxl --device cuda --repeats 1 --images 8 --batch-size 4 \
  --baseline-batch 4 --baseline-b1-images 2 --train-steps 20 --quality-images 2 --out "$OUT/sdxl" \
  > "$OUT/sdxl.log" 2>&1
echo "sdxl exit $?" >> "$OUT/sdxl.log"
tail -n 30 "$OUT/sd15.log" "$OUT/sdxl.log"
