#!/usr/bin/env bash
# Pro-GRPO presets. Usage: bash run.sh [demo|test|bench|flops|compare|sd35|sd35-flash|sd35-baseline|sd14|sd14-baseline|sd14-multi] [extra flags]
#   (none) / demo   CPU demo: tiny random-weight SD3, weight-free colour reward, a few minutes on 2 cores
#   test            the test suite (CPU, offline)
#   bench           kernels/bench.py: Triton vs torch timings
#   sd35*           the paper's flow settings on a GPU (SD3.5-Medium, PickScore); needs `hf auth login`
#   sd14*           the paper's diffusion settings on a GPU (SD-v1.4, DDIM eta 1, HPSv2.1)
set -euo pipefail
cd "$(dirname "$0")"
preset="${1:-demo}"
[ $# -gt 0 ] && shift

# --- environment: .venv with requirements.txt; a CPU build of torch where there is no NVIDIA GPU ---
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
PY=.venv/bin/python
if ! "$PY" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        "$PY" -m pip install -q torch
    else  # plain `pip install torch` would pull a multi-GB CUDA build onto a CPU-only machine: the CPU
          # index offers 2.13.0+cpu, which pip prefers; where that index is unreachable it fails fast
        "$PY" -m pip install -q torch==2.13.0 --extra-index-url https://download.pytorch.org/whl/cpu --retries 0 --timeout 10
    fi
fi
if ! "$PY" -c "import diffusers, transformers, peft, matplotlib, pytest, tqdm" 2>/dev/null || [ requirements.txt -nt .venv/.installed ]; then
    "$PY" -m pip install -q -r requirements.txt
    touch .venv/.installed
fi

fetch_pickscore_prompts() {  # Flow-GRPO ships the Pick-a-Pic v1 captions it trains on
    mkdir -p dataset/pickscore
    for split in train test; do
        [ -s "dataset/pickscore/$split.txt" ] && continue
        url="https://raw.githubusercontent.com/yifan123/flow_grpo/main/dataset/pickscore/$split.txt"
        if ! curl -fsSL --max-time 120 "$url" -o "dataset/pickscore/$split.txt"; then
            rm -f "dataset/pickscore/$split.txt"
            echo "error: could not download the Pick-a-Pic prompts; get them with: curl -fsSL $url -o dataset/pickscore/$split.txt" >&2
            exit 2
        fi
    done
}

fetch_hpsv2_prompts() {  # the HPSv2 benchmark prompts (4 styles x 800); every 8th is held out for evaluation
    "$PY" -c "import open_clip, hpsv2" 2>/dev/null || "$PY" -m pip install -q open_clip_torch hpsv2
    [ -s dataset/hpsv2/train.txt ] && return
    mkdir -p dataset/hpsv2
    "$PY" -c "
import hpsv2
prompts = [p.strip() for style in hpsv2.benchmark_prompts('all').values() for p in style]
open('dataset/hpsv2/train.txt', 'w').write('\n'.join(prompts) + '\n')
open('dataset/hpsv2/test.txt', 'w').write('\n'.join(prompts[::8]) + '\n')"
}

NPROC="${NPROC:-$( (nvidia-smi -L 2>/dev/null || true) | wc -l)}"
[ "$NPROC" -ge 1 ] || NPROC=1
WORLD=$((NPROC * ${NNODES:-1}))
launch() {  # torchrun over every visible GPU of every node; NPROC, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT honoured
    if [ "$WORLD" -eq 1 ]; then
        "$PY" progrpo.py "$@"
    else
        "$PY" -m torch.distributed.run --nproc_per_node "$NPROC" --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
            --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" progrpo.py "$@"
    fi
}

SD35=(--pretrained_model_name_or_path stabilityai/stable-diffusion-3.5-medium --reward pickscore
      --prompts dataset/pickscore/train.txt --eval_prompts dataset/pickscore/test.txt --mixed_precision fp16
      --resolution 512 --num_steps 10 --eval_steps 40 --noise_level 0.7 --guidance_scale 4.5 --prompts_per_epoch 48
      --learning_rate 3e-4 --clip_range 1e-4 --beta 0.01 --rank 32 --lora_alpha 64 --ema)

SD14=(--pretrained_model_name_or_path CompVis/stable-diffusion-v1-4 --reward hpsv2
      --prompts dataset/hpsv2/train.txt --eval_prompts dataset/hpsv2/test.txt --mixed_precision bf16
      --resolution 512 --num_steps 50 --eval_steps 50 --noise_level 1.0 --guidance_scale 5.0 --prompts_per_epoch $((4 * WORLD))
      --full_finetune --learning_rate 1e-5 --clip_range 1e-4 --beta 0 --sample_batch_size 16 --train_batch_size 4)

case "$preset" in
    demo)
        "$PY" progrpo.py --pretrained_model_name_or_path tiny --prompts demo --eval_prompts demo --reward colour \
            --resolution 16 --mixed_precision no --max_sequence_length 16 --num_epochs 150 --prompts_per_epoch 6 \
            --group_size 16 --prune 5:8,7:4 --sample_batch_size 32 --decode_batch_size 32 --train_batch_size 8 \
            --eval_steps 10 --eval_every 10 --checkpointing_steps 1000 --learning_rate 5e-3 --clip_range 1e-2 --beta 0 \
            --output_dir outputs/demo "$@"
        echo "pictures: outputs/demo/samples/*.png and outputs/demo/reward_curve.png; metrics: outputs/demo/metrics.jsonl"
        ;;
    test)
        HF_HUB_OFFLINE=1 "$PY" -m pytest -q test_progrpo.py kernels "$@"
        ;;
    bench)
        "$PY" -m kernels.bench "$@"
        ;;
    compare)        # matched compute on the demo task: GRPO, expanded GRPO, static OVF, Pro-GRPO x 3 seeds (~20 min on 2 cores)
        "$PY" progrpo.py --pretrained_model_name_or_path tiny --prompts demo --eval_prompts demo --reward colour \
            --resolution 16 --mixed_precision no --max_sequence_length 16 --num_epochs 1000 --prompts_per_epoch 6 \
            --sample_batch_size 32 --decode_batch_size 32 --train_batch_size 8 --eval_steps 10 --eval_every 10 \
            --checkpointing_steps 100000 --learning_rate 5e-3 --clip_range 1e-2 --beta 0 \
            --compare --compare_seeds 3 --max_flops 5e12 --output_dir outputs/compare "$@"
        echo "report: outputs/compare/comparison.md and outputs/compare/comparison.png"
        ;;
    flops)          # per-epoch FLOPs of the presets for the real architectures, on the meta device (no weights)
        HF_HUB_OFFLINE=1 "$PY" progrpo.py --flops_only "$@"
        ;;
    sd35)           # Pro-GRPO: 48 -> 24 -> 12 at steps {5, 7}
        fetch_pickscore_prompts
        launch "${SD35[@]}" --group_size 48 --prune 5:24,7:12 --output_dir outputs/sd35 "$@"
        ;;
    sd35-flash)     # Pro-GRPO-Flash: 24 -> 16 -> 12 (checkpoints not stated in the paper; we use {5, 7})
        fetch_pickscore_prompts
        launch "${SD35[@]}" --group_size 24 --prune 5:16,7:12 --output_dir outputs/sd35-flash "$@"
        ;;
    sd35-baseline)  # Flow-GRPO: G = 24, no pruning
        fetch_pickscore_prompts
        launch "${SD35[@]}" --group_size 24 --prune none --output_dir outputs/sd35-baseline "$@"
        ;;
    sd14)           # Pro-GRPO on SD-v1.4: 48 -> 32 -> 8 at steps {30, 40} of 50, HPSv2.1
        fetch_hpsv2_prompts
        launch "${SD14[@]}" --group_size 48 --prune 30:32,40:8 --output_dir outputs/sd14 "$@"
        ;;
    sd14-baseline)  # DanceGRPO-like: G = 16, no pruning
        fetch_hpsv2_prompts
        launch "${SD14[@]}" --group_size 16 --prune none --output_dir outputs/sd14-baseline "$@"
        ;;
    sd14-multi)     # the paper's multi-objective run: HPSv2.1 + CLIP score
        fetch_hpsv2_prompts
        launch "${SD14[@]}" --group_size 48 --prune 30:32,40:8 --reward hpsv2:1.0,clipscore:1.0 \
            --output_dir outputs/sd14-multi "$@"
        ;;
    *)
        echo "error: unknown preset '$preset'; choose demo, test, bench, flops, compare, sd35, sd35-flash, sd35-baseline, sd14, sd14-baseline or sd14-multi" >&2
        exit 2
        ;;
esac
