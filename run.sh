#!/usr/bin/env bash
# Pro-GRPO presets. Usage: bash run.sh [demo|shapes|test|lock|bench|flops|compare|preflight|premise|eval|sd35|
#   sd35-flash|sd35-baseline|sd14|sd14-baseline|sd14-multi|flux|flux-baseline] [extra flags]
#   (none) / demo   CPU demo: Pro-GRPO on a small pretrained SD3-class digits model and a learned digit reward
#   test            the test suite (CPU, offline)
#   lock            move requirements.lock to the newest releases that pass the suite
#   bench           progrpo_kernels/bench.py: Triton vs torch timings
#   eval            the paper's evaluation: bash run.sh eval sd35|sd14|flux|demo [--weights DIR ...] (repro/eval.py)
#   premise         will pruning help? bash run.sh premise demo|shapes|sd35|sd14|... [flags] (repro/premise.py)
#   sd35*           the paper's flow settings on a GPU (SD3.5-Medium, PickScore); needs `hf auth login`
#   sd14*           the paper's diffusion settings on a GPU (SD-v1.4, DDIM eta 1, HPSv2.1)
#   flux*           FLUX.1-dev with Flow-GRPO's pickscore_flux settings (the paper trains no FLUX); needs
#                   `hf auth login`
set -euo pipefail
cd "$(dirname "$0")"
preset="${1:-demo}"
[ $# -gt 0 ] && shift

# --- environment: .venv holding exactly the versions in requirements.lock (the set the suite last passed with) ---
# The lock is a pip constraints file: plain pip reads it, it pins dependencies of dependencies too, and a pin for
# a package this machine does not need is ignored. `bash run.sh lock` moves it forward (see the lock preset).
LOCK=requirements.lock

install_env() {  # install_env PYTHON CONSTRAINTS: torch as this machine needs it, requirements.txt, the test extras
    local py="$1" constraints="$2" torch_version
    torch_version=$(sed -n 's/^torch==//p' "$constraints")
    if command -v nvidia-smi >/dev/null 2>&1; then  # the CUDA build pins its own triton and nvidia-* wheels
        grep -v '^triton==' "$constraints" > "$constraints.cuda"
        constraints="$constraints.cuda"
        "$py" -m pip install -q "torch==$torch_version" || return
    else  # plain `pip install torch` would pull a multi-GB CUDA build onto a CPU-only machine: the CPU index
          # offers the +cpu build, which pip prefers; where that index is unreachable it fails fast
        "$py" -m pip install -q "torch==$torch_version" --extra-index-url https://download.pytorch.org/whl/cpu \
            --retries 0 --timeout 10 || return
    fi
    "$py" -m pip install -q -r requirements.txt -c "$constraints" || return  # (set -e is off inside `if` and `||`)
    # open_clip's own code checks our HPSv2.1 scorer; --no-deps: its torchvision would not load beside CPU torch
    "$py" -m pip install -q --no-deps -c "$constraints" open_clip_torch ftfy wcwidth
}

setup_failed() {
    echo "error: setting up .venv failed (pip says why above). It needs python3 >= 3.10 with venv (Debian:" \
        "apt install python3-venv) and the package index; rm -rf .venv and rerun, or see README's Set-up" >&2
    exit 2
}

PY=.venv/bin/python
stamp="$(cat requirements.txt "$LOCK" | sha256sum | cut -c1-16)"  # a changed lock or requirements.txt reinstalls
if [ "$preset" != lock ] && [ "$(cat .venv/.installed 2>/dev/null)" != "$stamp" ]; then
    [ -x "$PY" ] || python3 -m venv .venv || { rm -rf .venv; setup_failed; }
    cp "$LOCK" .venv/lock.txt  # install_env may write a .cuda variant beside it
    install_env "$PY" .venv/lock.txt || setup_failed
    echo "$stamp" > .venv/.installed
fi

fetch_pickscore_prompts() {  # Flow-GRPO ships the Pick-a-Pic v1 captions it trains on
    mkdir -p dataset/pickscore
    for split in train test; do
        [ -s "dataset/pickscore/$split.txt" ] && continue
        url="https://raw.githubusercontent.com/yifan123/flow_grpo/main/dataset/pickscore/$split.txt"
        if ! curl -fsSL --max-time 120 "$url" -o "dataset/pickscore/$split.txt"; then
            rm -f "dataset/pickscore/$split.txt"
            echo "error: could not download the Pick-a-Pic prompts; get them with:" \
                "curl -fsSL $url -o dataset/pickscore/$split.txt" >&2
            exit 2
        fi
    done
}

fetch_hpsv2_prompts() {  # HPSv2.1's open_clip; train on HPDv2's training prompts, evaluate on the HPSv2 benchmark
    # The reward needs only open_clip_torch: the prompts are plain files, so not the hpsv2 package, whose pins
    # (pytest==7.2.0, protobuf<4) would downgrade this environment. A constraints file holds every package that
    # requirements.txt names at its installed version, so pip cannot move one; the comparison after proves it.
    local versions='import re, importlib.metadata as md
for line in open("requirements.txt"):
    name = re.match(r"\s*([A-Za-z0-9_.-]+)", line.split("#")[0])
    found = name and list(md.distributions(name=name[1]))  # none: not installed here, nothing to keep
    if found:
        print(f"{name[1]}=={found[0].version}")'
    if ! "$PY" -c "import open_clip" 2>/dev/null; then
        local pins before
        pins="$(mktemp)"
        "$PY" -c "$versions" > "$pins"
        before="$(cat "$pins")"
        if ! "$PY" -m pip install -q -c "$pins" open_clip_torch; then
            rm -f "$pins"
            echo "error: open_clip_torch cannot install beside the requirements.txt versions (pip says why above)" >&2
            exit 2
        fi
        rm -f "$pins"
        if [ "$("$PY" -c "$versions")" != "$before" ]; then
            echo "error: installing open_clip_torch changed what requirements.txt asks for:" \
                "$(diff <(echo "$before") <("$PY" -c "$versions") | grep '^[<>]' | tr '\n' ' ')" >&2
            exit 2
        fi
    fi
    if ! "$PY" -c "import open_clip" 2>/dev/null; then
        echo "error: open_clip does not import (often torchvision not matching torch): $PY -c 'import open_clip'" >&2
        exit 2
    fi
    # Sources: DanceGRPO trains SD-v1.4 on assets/prompts.txt (HPDv2's training prompts, one a line); the benchmark
    # is HPDv2's benchmark/{anime,concept-art,paintings,photo}.json (800 prompts each, a JSON list of strings),
    # the files hpsv2.benchmark_prompts() reads.
    mkdir -p dataset/hpsv2/raw
    local name url hpd=https://huggingface.co/datasets/zhwang/HPDv2/resolve/main/benchmark
    for name in prompts.txt anime.json concept-art.json paintings.json photo.json; do
        [ -s "dataset/hpsv2/raw/$name" ] && continue
        url="$hpd/$name"
        [ "$name" = prompts.txt ] && url=https://raw.githubusercontent.com/XueZeyue/DanceGRPO/main/assets/prompts.txt
        if ! curl -fsSL --max-time 300 "$url" -o "dataset/hpsv2/raw/$name"; then
            rm -f "dataset/hpsv2/raw/$name"
            echo "error: could not download $name; get it with: curl -fsSL $url -o dataset/hpsv2/raw/$name" >&2
            exit 2
        fi
    done
    # train.txt: the training prompts less any benchmark prompt; test.txt: the benchmark with the four styles
    # interleaved, so --num_eval_prompts N takes N/4 of each. Then refuse files that share a prompt (compared
    # case- and whitespace-blind), such as an older run.sh's, which trained on the benchmark itself.
    "$PY" - <<'EOF'
import json, os, sys
from itertools import chain, zip_longest
d, key = "dataset/hpsv2", lambda p: " ".join(p.split()).casefold()
if not (os.path.isfile(f"{d}/train.txt") and os.path.isfile(f"{d}/test.txt")):
    styles = []
    for style in ("anime", "concept-art", "paintings", "photo"):
        try:
            prompts = json.load(open(f"{d}/raw/{style}.json", encoding="utf-8"))
            assert isinstance(prompts, list) and all(isinstance(p, str) for p in prompts)
        except (ValueError, AssertionError):
            print(f"error: {d}/raw/{style}.json is not a JSON list of prompts; delete it and rerun", file=sys.stderr)
            sys.exit(2)
        styles.append([" ".join(p.split()) for p in prompts if p.strip()])
    bench = [p for p in chain(*zip_longest(*styles)) if p is not None]
    seen = {key(p) for p in bench}
    lines = [" ".join(p.split()) for p in open(f"{d}/raw/prompts.txt", encoding="utf-8") if p.strip()]
    train = [p for p in lines if key(p) not in seen]
    open(f"{d}/train.txt", "w", encoding="utf-8").write("\n".join(train) + "\n")
    open(f"{d}/test.txt", "w", encoding="utf-8").write("\n".join(bench) + "\n")
    print(f"{d}: {len(train)} training prompts ({len(lines) - len(train)} benchmark prompts left out), "
          f"{len(bench)} benchmark prompts for evaluation")
train = {key(p) for p in open(f"{d}/train.txt", encoding="utf-8") if p.strip()}
shared = [p.strip() for p in open(f"{d}/test.txt", encoding="utf-8") if key(p) in train]
if shared:
    print(f"error: {d}/train.txt and test.txt share {len(shared)} prompts (first: '{shared[0]}'); "
          f"delete {d}/train.txt and {d}/test.txt and rerun to rebuild them", file=sys.stderr)
    sys.exit(2)
EOF
}

if [ -n "${CUDA_VISIBLE_DEVICES+x}" ]; then  # the GPUs this process may use, as torch counts them
    visible=$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .) || true
else
    visible=$( (nvidia-smi -L 2>/dev/null || true) | wc -l)
fi
NPROC="${NPROC:-$visible}"
[ "$NPROC" -ge 1 ] || NPROC=1
WORLD=$((NPROC * ${NNODES:-1}))
launch() {  # launch FETCH FLAGS...: progrpo.py's own checks of FLAGS first (no model, no download), so a typo or a
            # flag the preset cannot take fails at once in one line, not after FETCH (the prompts) nor once per
            # torchrun process; then progrpo.py over every visible GPU of every node, honouring NPROC, NNODES,
            # NODE_RANK, MASTER_ADDR and MASTER_PORT
    "$PY" -c 'import sys, progrpo
sys.argv[0] = "progrpo.py"  # the name its usage line shows
try:
    progrpo.validate(progrpo.parse_args())
except progrpo.RunError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)' "${@:2}"
    "$1"
    shift
    if [ "$WORLD" -eq 1 ]; then
        "$PY" progrpo.py "$@"
    else
        "$PY" -m torch.distributed.run --nproc_per_node "$NPROC" --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
            --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" progrpo.py "$@"
    fi
}

SD35=(--pretrained_model_name_or_path stabilityai/stable-diffusion-3.5-medium --reward repro.scorers.PickScore
      --prompts dataset/pickscore/train.txt --eval_prompts dataset/pickscore/test.txt --mixed_precision fp16
      --resolution 512 --num_steps 10 --eval_steps 40 --noise_level 0.7 --guidance_scale 4.5 --prompts_per_epoch 48
      --learning_rate 3e-4 --clip_range 1e-4 --beta 0.01 --rank 32 --lora_alpha 64 --ema
      --sample_batch_size 8 --train_batch_size 8)  # one size: SD3's outputs change with the batch size

SD14=(--pretrained_model_name_or_path CompVis/stable-diffusion-v1-4 --reward repro.scorers.HPSv2
      --prompts dataset/hpsv2/train.txt --eval_prompts dataset/hpsv2/test.txt --mixed_precision bf16 --resolution 512
      --num_steps 50 --eval_steps 50 --noise_level 1.0 --guidance_scale 5.0 --prompts_per_epoch $((4 * WORLD))
      --full_finetune --learning_rate 1e-5 --clip_range 1e-4 --beta 0 --sample_batch_size 8 --train_batch_size 8
      --no-ema)  # DanceGRPO keeps no EMA

# Flow-GRPO's pickscore_flux (config/grpo.py, scripts/train_flux.py): 6 SDE steps (5 trained), 28 eval steps, the
# distilled guidance 3.5 as a model input, noise level 0.9, beta 0, LoRA r 64 / alpha 128, 3 trajectories per call.
# bf16: the 12B transformer's frozen weights in bf16 (~24 GB), the text encoders on the GPU only while encoding.
FLUX=(--pretrained_model_name_or_path black-forest-labs/FLUX.1-dev --reward repro.scorers.PickScore
      --prompts dataset/pickscore/train.txt --eval_prompts dataset/pickscore/test.txt --mixed_precision bf16
      --resolution 512 --num_steps 6 --eval_steps 28 --noise_level 0.9 --guidance_scale 3.5 --max_sequence_length 128
      --prompts_per_epoch 48 --learning_rate 3e-4 --clip_range 1e-4 --beta 0 --rank 64 --lora_alpha 128 --ema
      --sample_batch_size 3 --train_batch_size 3)

# The compositional shapes testbed (repro/shapes.py): its shipped model, checker and prompts; eval: the 136
# held-out compositions of eval.txt; one optimiser step an epoch on all of an arm's survivors
SHAPES=(--pretrained_model_name_or_path repro/shapes/pipeline --reward repro.shapes.ShapesReward
        --prompts repro/shapes/train.txt --eval_prompts repro/shapes/eval.txt --num_eval_prompts 136 --resolution 32
        --mixed_precision no --max_sequence_length 45 --prompts_per_epoch 6 --updates_per_epoch 1
        --sample_batch_size 48 --decode_batch_size 48 --train_batch_size 8 --eval_steps 10 --checkpointing_steps 1000
        --clip_range 1e-2 --beta 0 --no-ema)

case "$preset" in
    demo)           # Pro-GRPO on the pretrained digits model and its learned reward (repro/digits.py), 90 s idle
        [ -f repro/digits/pipeline/model_index.json ] || "$PY" -m repro.digits make
        "$PY" progrpo.py --pretrained_model_name_or_path repro/digits/pipeline --reward repro.digits.DigitReward \
            --prompts repro/digits/train.txt --eval_prompts repro/digits/eval.txt --num_eval_prompts 20 \
            --resolution 16 --mixed_precision no --max_sequence_length 24 --num_epochs 80 --prompts_per_epoch 6 \
            --group_size 16 --prune 5:8,7:4 --sample_batch_size 48 --decode_batch_size 48 --train_batch_size 8 \
            --eval_steps 10 --eval_every 10 --checkpointing_steps 1000 --learning_rate 5e-4 --clip_range 1e-2 \
            --beta 0 --no-ema --output_dir outputs/demo "$@"
        echo "pictures: outputs/demo/samples/*.png, outputs/demo/reward_curve.png; metrics: outputs/demo/metrics.jsonl"
        ;;
    shapes)         # Pro-GRPO on the compositional shapes testbed (repro/shapes.py): GenEval-like prompts, a
                    # reward that counts satisfied constraints; eval on the 136 held-out compositions (3.7 min)
        "$PY" progrpo.py "${SHAPES[@]}" --num_epochs 40 --group_size 16 --prune 5:8,7:4 --eval_every 10 \
            --learning_rate 1e-3 --output_dir outputs/shapes "$@"
        echo "pictures: outputs/shapes/samples/*.png, outputs/shapes/reward_curve.png;" \
             "metrics: outputs/shapes/metrics.jsonl"
        ;;
    test)           # PROGRPO_LOCK: the pins .venv was installed with, which a test compares with what is installed
        used="$LOCK"
        [ -f .venv/lock.txt.cuda ] && used=.venv/lock.txt.cuda
        PROGRPO_LOCK="$used" HF_HUB_OFFLINE=1 "$PY" -m pytest -q test_progrpo.py progrpo_kernels repro "$@"
        ;;
    lock)           # move the lock forward: the newest releases in a throwaway venv, the suite run there, and the lock
                    # rewritten only if it passes. Extra arguments are pip constraints:
                    # `bash run.sh lock torch==2.14.1`, `bash run.sh lock 'transformers<5.26'`; torch stays at the
                    # locked version unless named.
        tmp="$(mktemp -d)"
        trap 'rm -rf "$tmp"' EXIT
        grep '^torch==' "$LOCK" > "$tmp/constraints.txt"
        for c in "$@"; do
            case "$c" in torch==*) sed -i '/^torch==/d' "$tmp/constraints.txt" ;; esac
            echo "$c" >> "$tmp/constraints.txt"
        done
        python3 -m venv "$tmp/venv" || setup_failed
        echo "lock: installing the newest releases that satisfy requirements.txt and:" \
            "$(tr '\n' ' ' < "$tmp/constraints.txt")"
        if ! install_env "$tmp/venv/bin/python" "$tmp/constraints.txt"; then
            echo "error: that set does not install (pip says why above); $LOCK is unchanged" >&2
            exit 1
        fi
        "$tmp/venv/bin/python" -m pip freeze --exclude-editable | sed 's/^\(torch==[^+]*\)+.*/\1/' > "$tmp/freeze.txt"
        changes="$(diff <(grep -v '^#' "$LOCK") "$tmp/freeze.txt" | sed -n 's/^> //p' | tr '\n' ' ')" || true
        echo "lock: new versions: ${changes:-none}; running the suite with them (6 to 15 minutes on 2 cores)"
        mkdir -p outputs/lock
        if ! HF_HUB_OFFLINE=1 "$tmp/venv/bin/python" -m pytest -q -p no:cacheprovider test_progrpo.py progrpo_kernels \
                repro > outputs/lock/pytest.log 2>&1; then
            grep -E '^(FAILED|ERROR) ' outputs/lock/pytest.log | cut -c1-200 >&2 || true
            echo "error: $(tail -n 1 outputs/lock/pytest.log) under the new versions: ${changes:-none};" \
                "$LOCK is unchanged (log: outputs/lock/pytest.log)" >&2
            exit 1
        fi
        { echo "# The versions the suite last passed with: \`bash run.sh lock\` wrote this on $(date -u +%F)," \
               "Python $("$tmp/venv/bin/python" -c 'import platform; print(platform.python_version())')," \
               "$(uname -m), with"
          echo "# '$(tail -n 1 outputs/lock/pytest.log)'. run.sh installs with pip -c $LOCK;" \
               "requirements.txt: lower bounds."
          cat "$tmp/freeze.txt"; } > "$LOCK"
        echo "lock: $(tail -n 1 outputs/lock/pytest.log); $LOCK rewritten (git diff $LOCK shows what moved)"
        ;;
    bench)
        "$PY" -m progrpo_kernels.bench "$@"
        ;;
    compare)        # matched compute: bash run.sh compare [digits|shapes|...] [flags]; 2 runs at a time
                    # digits (default): the demo's task, 5 methods x 1 cell x 3 seeds (6 min from a fresh clone on 2
                    # idle cores, 2026-12-06). shapes: the compositional testbed, 5 methods x 2 learning rates x 5
                    # seeds, held-out compositions (65 min on 2 cores from a fresh clone, 2026-12-06). shapes-pool: the
                    # same on a fixed pool of 6 training prompts, 16 ODE samples of each evaluated, 1e13 FLOPs a run
                    # (about 2 h 11 min). shapes-ablation: Pro-GRPO's checkpoints (early, the paper's, late) and
                    # G_max (16, 32), 3 seeds (16 min)
        target=digits
        case "${1:-}" in digits|shapes|shapes-pool|shapes-ablation) target="$1"; shift ;; esac
        case "$target" in
            digits)
                [ -f repro/digits/pipeline/model_index.json ] || "$PY" -m repro.digits make
                OMP_NUM_THREADS=1 "$PY" -m repro.compare --pretrained_model_name_or_path repro/digits/pipeline \
                    --reward repro.digits.DigitReward --prompts repro/digits/train.txt \
                    --eval_prompts repro/digits/eval.txt --num_eval_prompts 20 --resolution 16 --mixed_precision no \
                    --max_sequence_length 24 --prompts_per_epoch 6 --sample_batch_size 48 --decode_batch_size 48 \
                    --train_batch_size 8 --eval_steps 10 --eval_every 5 --checkpointing_steps 1000 --clip_range 1e-2 \
                    --beta 0 --no-ema --grid_learning_rate 1e-3 --grid_clip_range 1e-2 --seeds 3 --max_flops 1e12 \
                    --jobs 2 --diagnose_epochs 4 --output_dir outputs/compare "$@"
                out=outputs/compare ;;
            shapes)
                OMP_NUM_THREADS=1 "$PY" -m repro.compare "${SHAPES[@]}" --eval_every 4 --max_flops 4e12 --jobs 2 \
                    --grid_learning_rate 1e-3,3e-3 --seeds 5 --output_dir outputs/compare-shapes "$@"
                out=outputs/compare-shapes ;;
            shapes-pool)
                OMP_NUM_THREADS=1 "$PY" -m repro.compare "${SHAPES[@]}" --prompts repro/shapes/pool.txt \
                    --eval_prompts repro/shapes/pool_eval.txt --num_eval_prompts 96 --eval_every 10 --max_flops 1e13 \
                    --jobs 2 --grid_learning_rate 1e-3,3e-4 --seeds 5 --output_dir outputs/compare-shapes-pool "$@"
                out=outputs/compare-shapes-pool ;;
            shapes-ablation)
                OMP_NUM_THREADS=1 "$PY" -m repro.compare "${SHAPES[@]}" --eval_every 4 --max_flops 4e12 --jobs 2 \
                    --grid_learning_rate 1e-3 --seeds 3 \
                    --methods pro-grpo,pro-grpo-early,pro-grpo-late,pro-grpo-g32 \
                    --output_dir outputs/compare-shapes-ablation "$@"
                out=outputs/compare-shapes-ablation ;;
        esac
        echo "report: $out/comparison.md, $out/comparison.png"
        ;;
    eval)           # the paper's evaluation (repro/eval.py): bash run.sh eval sd35|sd14|flux|demo [--weights DIR ...]
        target="${1:-demo}"
        [ $# -gt 0 ] && shift
        [ "$target" = sd14 ] && fetch_hpsv2_prompts  # the HPSv2 benchmark prompts and open_clip for HPSv2.1
        "$PY" -m repro.eval "$target" "$@"
        ;;
    flops)          # per-epoch FLOPs of the presets for the real architectures, on the meta device (no weights)
        HF_HUB_OFFLINE=1 "$PY" -m repro.flops "$@"
        ;;
    preflight)      # before a long GPU run: a preset's real architectures, random weights, one short epoch
        HF_HUB_OFFLINE=1 "$PY" -m repro.preflight --world_size "$WORLD" "$@"
        ;;
    premise)        # will pruning help on this model and reward, and where? (repro/premise.py): proxy fidelity per
                    # step beside its ceiling, kept-set vs chance, clustering, a suggested --prune. demo: ~2 min on CPU
        target="${1:-demo}"
        [ $# -gt 0 ] && shift
        case "$target" in
            demo|digits) [ -f repro/digits/pipeline/model_index.json ] || "$PY" -m repro.digits make ;;
            sd35*) fetch_pickscore_prompts ;;
            sd14*) fetch_hpsv2_prompts ;;
        esac
        "$PY" -m repro.premise "$target" "$@"
        ;;
    sd35)           # Pro-GRPO: 48 -> 24 -> 12 at steps {5, 7}
        launch fetch_pickscore_prompts "${SD35[@]}" --group_size 48 --prune 5:24,7:12 --output_dir outputs/sd35 "$@"
        ;;
    sd35-flash)     # Pro-GRPO-Flash: 24 -> 16 -> 12 (checkpoints not stated in the paper; we use {5, 7})
        launch fetch_pickscore_prompts "${SD35[@]}" --group_size 24 --prune 5:16,7:12 --output_dir outputs/sd35-flash \
            "$@"
        ;;
    sd35-baseline)  # Flow-GRPO: G = 24, no pruning, one std over the epoch's rewards (its pickscore_sd3 config)
        launch fetch_pickscore_prompts "${SD35[@]}" --group_size 24 --prune none --global_std \
            --output_dir outputs/sd35-baseline "$@"
        ;;
    sd14)           # Pro-GRPO on SD-v1.4: 48 -> 32 -> 8 at steps {30, 40} of 50, HPSv2.1
        launch fetch_hpsv2_prompts "${SD14[@]}" --group_size 48 --prune 30:32,40:8 --output_dir outputs/sd14 "$@"
        ;;
    sd14-baseline)  # DanceGRPO-like: G = 16, no pruning, a group's trajectories start from one shared latent
        launch fetch_hpsv2_prompts "${SD14[@]}" --group_size 16 --prune none --shared_noise \
            --output_dir outputs/sd14-baseline "$@"
        ;;
    sd14-multi)     # the paper's multi-objective run: HPSv2.1 + CLIP score
        launch fetch_hpsv2_prompts "${SD14[@]}" --group_size 48 --prune 30:32,40:8 \
            --reward repro.scorers.HPSv2:1.0,repro.scorers.CLIPScore:1.0 --output_dir outputs/sd14-multi "$@"
        ;;
    flux)           # Pro-GRPO on FLUX.1-dev: 48 -> 24 -> 12 at steps {3, 4} of 6: sigma 0.65, 0.48 (sd35's: 0.71, 0.46)
        launch fetch_pickscore_prompts "${FLUX[@]}" --group_size 48 --prune 3:24,4:12 --output_dir outputs/flux "$@"
        ;;
    flux-baseline)  # Flow-GRPO's pickscore_flux: G = 24, no pruning, one std over the epoch's rewards
        launch fetch_pickscore_prompts "${FLUX[@]}" --group_size 24 --prune none --global_std \
            --output_dir outputs/flux-baseline "$@"
        ;;
    *)
        echo "error: unknown preset '$preset'; choose demo, shapes, test, lock, bench, flops, compare, preflight," \
            "premise, eval, sd35, sd35-flash, sd35-baseline, sd14, sd14-baseline, sd14-multi, flux or flux-baseline" >&2
        exit 2
        ;;
esac
