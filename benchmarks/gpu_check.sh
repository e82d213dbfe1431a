#!/usr/bin/env bash
# Everything to confirm on a GPU, in one prepared run of at most $BUDGET_S seconds (8.5 minutes; every
# step has its own time limit, and no step starts or runs past the budget). Steps in order of priority:
#   1. the fused Triton kernels, compiled natively, against the PyTorch path (tests/test_kernels.py);
#   2. whole-model agreement of the backends at SiT-XL/2 width, fp32 and bf16 (check_backends.py);
#   3. dar bench, SiT-XL/2 in bf16: step/memory/sampling ratios, training images/s and MFU of residual,
#      static c4, static_t c4 and dynamic c4;
#   4. the ImageNet latent pipeline at full size with random weights (docs/IMAGENET.md):
#      latent-setup     a random SD-VAE of sd-vae-ft-ema's architecture (83.7M parameters), a few hundred
#                       synthetic 256 px images in class folders, random Inception weights (CPU);
#      prepare-latents  `dar prepare-latents --flip` on them: encoding images/s (the last log line);
#      vae-decode       SD-VAE decoding images/s of 32x32x4 latents, fp32 (what `dar sample` uses) and bf16;
#      fsdp-1gpu        `torchrun --nproc_per_node 1 -m dar.cli train ... train.parallel=fsdp`: SiT-XL/2 bf16
#                       on those latents, a sample grid decoded by data.vae, a checkpoint; images/s;
#      sample-decode    `dar sample` of that checkpoint, decoded to 256 px images by the checkpoint's data.vae;
#      eval-inception   `dar eval --make-ref` + `dar eval` of those samples with the Inception network
#                       (random weights: --allow-unknown-weights --force; the numbers are not FID);
#   5. our residual SiT-XL/2 against SiT's reference design in bf16;
#   6. dar bench of SiT-B/2, on the fused and on the PyTorch backend (what the fused kernel buys);
#   7. latent-smoke: tests/test_latent_pipeline.py on the GPU (the CPU test's tiny pipeline, DAR_TEST_DEVICE).
# Reports go to $OUT (default runs/gpu_check): one log and a JSON per step. It uses the machine's own
# python3 and its packages (torch, triton, pytest, safetensors, torchdiffeq, diffusers...), installing nothing.
#
#   OUT=runs/gpu_check bash benchmarks/gpu_check.sh
#   DEVICE=cpu SMALL=cpu LARGE=cpu TRITON_INTERPRET=1 bash benchmarks/gpu_check.sh   # dry run of the flow
# A dry run (DEVICE=cpu) makes the latent steps small: 4 images, the tiny test VAE, SiT-Nano/4.
# ONLY=name,name,... runs just those steps (e.g. a rerun of the failed ones; latent-setup first for the
# latent steps, which read its files).
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
DEVICE=${DEVICE:-cuda}
SMALL=${SMALL:-sit-b2}
LARGE=${LARGE:-sit-xl2}
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-510}
ONLY=${ONLY:-}
LAT="$OUT/latent"  # the latent pipeline's files (rebuilt by latent-setup)
if [[ $DEVICE == cpu ]]; then
  LATENT_IMAGES=${LATENT_IMAGES:-4} VAE_SIZE=${VAE_SIZE:-tiny} DECODE_N=${DECODE_N:-4} SAMPLE_N=${SAMPLE_N:-8}
else
  LATENT_IMAGES=${LATENT_IMAGES:-256} VAE_SIZE=${VAE_SIZE:-full} DECODE_N=${DECODE_N:-256} SAMPLE_N=${SAMPLE_N:-64}
fi
case $LARGE in
  sit-xl2) LATENT_ARCH=SiT-XL/2 ;; sit-b2) LATENT_ARCH=SiT-B/2 ;; sit-s2) LATENT_ARCH=SiT-S/2 ;; *) LATENT_ARCH=SiT-Nano/4 ;;
esac
EVAL_DEVICE=cpu
[[ $DEVICE == cuda* ]] && EVAL_DEVICE=cuda  # `dar eval --device` takes cpu | cuda
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
failures=0

step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log it, never stop the script
  local name=$1 limit=$2 left=$((BUDGET_S - SECONDS))
  shift 2
  if [[ -n $ONLY && ",$ONLY," != *",$name,"* ]]; then
    return
  fi
  if ((left < 20)); then
    echo "== $name: skipped, ${left}s of the ${BUDGET_S}s budget left" | tee -a "$LOG"
    return
  fi
  ((limit > left)) && limit=$left
  echo "== $name (limit ${limit}s, at ${SECONDS}s): $*" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after ${SECONDS}s" | tee -a "$LOG"
  ((rc == 0)) || failures=$((failures + 1))
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || true
  $PY -c "import torch, platform; print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  $PY -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo "triton: not installed"
  $PY -c "import diffusers; print('diffusers', diffusers.__version__)" 2>/dev/null ||
    echo "diffusers: not installed (the latent steps need it)"
  git rev-parse HEAD 2>/dev/null || true
} 2>&1 | tee "$LOG"

step kernels 150 $PY -m pytest -q -x -p no:cacheprovider tests/test_kernels.py
step backends-fp32 60 $PY benchmarks/check_backends.py --preset "$LARGE" --device "$DEVICE" --precision fp32 \
  --backends torch,triton --batch 4 --json "$OUT/check_backends_fp32.json"
step backends-bf16 60 $PY benchmarks/check_backends.py --preset "$LARGE" --device "$DEVICE" --precision bf16 \
  --backends torch,triton --batch 4 --json "$OUT/check_backends_bf16.json"
step bench-large 180 $PY -m dar.cli bench --preset "$LARGE" --device "$DEVICE" --precision bf16 \
  --variants residual,static-c4,static_t-c4,dynamic-c4 --repeats 10 --warmup 3 --json "$OUT/bench_${LARGE}_bf16.json"

# -- the ImageNet latent pipeline, full size, random weights ---------------------------------------------
step latent-setup 60 $PY - "$LAT" "$LATENT_IMAGES" "$VAE_SIZE" <<'EOF'
import math, shutil, sys
from pathlib import Path
import numpy as np, torch
from PIL import Image
from dar.data.vae import save_vae, tiny_autoencoder
from dar.evaluate.inception import expected_state_dict_shapes

out, n, size = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
shutil.rmtree(out, ignore_errors=True)
torch.manual_seed(0)
if size == "full":  # sd-vae-ft-ema's architecture (diffusers AutoencoderKL defaults otherwise), random init
    from diffusers import AutoencoderKL
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
                        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=256, scaling_factor=0.18215)
else:
    vae = tiny_autoencoder(0)
save_vae(vae, out / "vae")
print(f"VAE ({size}): {sum(p.numel() for p in vae.parameters()) / 1e6:.1f}M parameters -> {out / 'vae'}")
rng = np.random.default_rng(0)
yy, xx = np.mgrid[0:256, 0:320] / 256
crops = []
for i in range(n):  # 4 classes of structured images, 320x256 (prepare-latents center-crops them to 256)
    label, a, b = i % 4, rng.uniform(2, 12), rng.uniform(0, 2 * math.pi)
    pattern = [np.sin(a * xx + b), np.sin(a * yy + b), np.sin(a * np.hypot(xx - 0.6, yy - 0.5) + b),
               np.sign(np.sin(a * (xx + yy) + b))][label]
    colours = rng.uniform(0, 255, (2, 3))
    pixels = (colours[0] + (colours[1] - colours[0]) * (pattern[..., None] + 1) / 2).astype(np.uint8)
    (out / "images" / f"class_{label}").mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(out / "images" / f"class_{label}" / f"{i:05d}.png")
    crops.append(pixels[:, 32:288])
np.savez(out / "images.npz", arr_0=np.stack(crops), labels=np.arange(n) % 4)
g = torch.Generator().manual_seed(0)  # the FID network's layout, random values: not FID
state = {k: torch.randn(s, generator=g) * math.sqrt(2 / math.prod(s[1:])) if len(s) > 1 else
         (torch.ones(s) if k.endswith(("weight", "running_var")) else torch.zeros(s))
         for k, s in expected_state_dict_shapes().items()}
torch.save(state, out / "inception_random.pth")
print(f"{n} images of 320x256 px in {out / 'images'}")
EOF
step prepare-latents 60 $PY -m dar.cli prepare-latents "$LAT/images" --out "$LAT/latents" --vae "$LAT/vae" \
  --resolution 256 --flip --device "$DEVICE"
step vae-decode 45 $PY - "$LAT/vae" "$DEVICE" "$DECODE_N" "$OUT/vae_decode.json" <<'EOF'
import json, sys, time
import torch
from dar.data.vae import load_vae

folder, device, n, report = sys.argv[1], sys.argv[2], int(sys.argv[3]), {}
sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
for dtype in (torch.float32, torch.bfloat16):
    vae = load_vae(folder, device, dtype)
    latents = torch.randn(n, 4, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    vae.decode(latents[:16])  # warm-up
    sync()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    images = vae.decode(latents, chunk=16)
    sync()
    seconds = time.perf_counter() - start
    name = str(dtype).removeprefix("torch.")
    report[name] = {"images": n, "seconds": seconds, "images_per_s": n / seconds, "chunk": 16,
                    "image_shape": list(images.shape[1:]),
                    "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if device.startswith("cuda") else None}
    print(f"decode {name}: {n / seconds:.1f} images/s ({n} latents 4x32x32 -> {list(images.shape[1:])})")
    del vae
json.dump(report, open(sys.argv[4], "w"), indent=2)
EOF
step fsdp-1gpu 150 $PY -m torch.distributed.run --standalone --nproc_per_node 1 -m dar.cli train \
  --preset imagenet256-xl --run-dir "$LAT/run_fsdp" --no-progress "model.arch=$LATENT_ARCH" \
  "data.path=$LAT/latents" "data.vae=$LAT/vae" train.parallel=fsdp train.steps=8 train.global_batch=32 \
  train.log_every=1 train.ckpt_every=8 train.sample_every=8 sampler.method=euler sampler.steps=2
[[ ( -z $ONLY || ,$ONLY, == *,fsdp-1gpu,* ) && -f $LAT/run_fsdp/metrics.jsonl ]] &&
  $PY - "$LAT/run_fsdp/metrics.jsonl" <<'EOF' 2>&1 | tee -a "$LOG"
import json, statistics, sys
steps = [r for r in map(json.loads, open(sys.argv[1])) if "loss" in r][2:]  # steps 1-2: warm-up
if steps:
    rate = statistics.median(r["steps_per_s"] for r in steps) * 32
    print(f"fsdp-1gpu: {rate:.1f} training images/s (median of steps {steps[0]['step']}-{steps[-1]['step']}, batch 32)")
EOF
step sample-decode 60 $PY -m dar.cli sample "$LAT/run_fsdp" --num "$SAMPLE_N" --batch-size 32 --out "$LAT/samples" \
  --grid "$LAT/samples_grid.png" --device "$DEVICE" --no-progress sampler.method=euler sampler.steps=2
step eval-inception 90 bash -c '"$0" -m dar.cli eval "$1/images.npz" --make-ref "$1/reference.npz" --extractor inception \
    --inception-weights "$1/inception_random.pth" --allow-unknown-weights --force --device "$2" &&
  "$0" -m dar.cli eval "$1/samples/samples.npz" --ref "$1/reference.npz" \
    --inception-weights "$1/inception_random.pth" --allow-unknown-weights --force --device "$2"' "$PY" "$LAT" "$EVAL_DEVICE"
# ---------------------------------------------------------------------------------------------------------

step reference 60 $PY benchmarks/bench_reference.py --preset "$LARGE" --device "$DEVICE" --precision bf16 \
  --repeats 10 --warmup 3 --json "$OUT/reference_${LARGE}_bf16.json"
step bench-small 90 $PY -m dar.cli bench --preset "$SMALL" --device "$DEVICE" --precision bf16 \
  --variants residual,static-c4,static_t-c4,dynamic-c4 --repeats 20 --warmup 5 --json "$OUT/bench_${SMALL}_bf16.json"
step bench-small-torch 60 $PY -m dar.cli bench --preset "$SMALL" --device "$DEVICE" --precision bf16 --backend torch \
  --variants residual,static-c4,dynamic-c4 --repeats 20 --warmup 5 --json "$OUT/bench_${SMALL}_bf16_torch.json"
step latent-smoke 90 env DAR_TEST_DEVICE="$DEVICE" $PY -m pytest -q -x -p no:cacheprovider tests/test_latent_pipeline.py

echo "== done in ${SECONDS}s, $failures step(s) failed" | tee -a "$LOG"
exit $((failures > 0))
