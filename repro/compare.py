"""The matched-compute comparison: GRPO, the expanded group trained in full, static OVF and Pro-GRPO, each run
until it has spent the same FLOPs (sampling, decode + reward calls, update), over several seeds.

    python -m repro.compare [progrpo.py flags] --seeds 3 --max_flops 5e12     (bash run.sh compare)

Each method's FLOPs per epoch are counted once on the real model (repro.flops.call_flops x the schedule's
counts), so its epochs = ceil(budget / FLOPs per epoch). Writes comparison.md and comparison.png.
"""

import argparse
import dataclasses
import math
import sys
from pathlib import Path

import numpy as np
import torch

import progrpo
from repro.flops import call_flops, epoch_flops


def epoch_total_flops(args):
    """FLOPs of one epoch of `args` on its model: per-call FLOPs counted on the real model x the schedule's counts."""
    schedule = progrpo.validate(args)
    device = torch.device("cpu")
    pipe = progrpo.load_pipeline(args.pretrained_model_name_or_path, progrpo.DTYPES[args.mixed_precision],
                                 args.full_finetune)
    progrpo.trainable_parameters(pipe, args)  # LoRA's matmuls count
    reward_fn = progrpo.build_reward(args.reward, device)
    prompt = progrpo.read_prompts(args.prompts)[0]
    text = progrpo.encode_prompts(pipe, [prompt], args.max_sequence_length)
    return epoch_flops(call_flops(pipe, reward_fn, text, prompt, args), args, schedule)["total"]


COMPARE_METHODS = {  # the demo task's four ways to spend the same compute (`bash run.sh compare`)
    "grpo": dict(group_size=8, prune="none"),  # plain GRPO at the baseline group size (Flow-GRPO: G = 24)
    "grpo-expanded": dict(group_size=16, prune="none"),  # the expanded group, sampled and trained in full
    "static-ovf": dict(group_size=16, prune="none", ovf_after_sampling=4),  # sample 16, train the max-variance 4
    "pro-grpo": dict(group_size=16, prune="5:8,7:4"),  # expand 16, prune to 8 then 4 inside the loop
}


def compare(args, seeds, max_flops):
    """Runs every method of COMPARE_METHODS for `seeds` seeds, each until it has spent `max_flops`, then writes
    comparison.md and reward-vs-FLOPs / reward-vs-time plots into args.output_dir."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.output_dir)
    results = {}
    for name, changes in COMPARE_METHODS.items():
        method = dataclasses.replace(args, **changes)
        per_epoch = epoch_total_flops(method)
        method = dataclasses.replace(method, num_epochs=math.ceil(max_flops / per_epoch))  # the first epoch at budget
        results[name] = []
        for seed in range(seeds):
            history = progrpo.main(dataclasses.replace(method, seed=seed, output_dir=str(out / f"{name}-seed{seed}")))
            for m in history:  # the epoch's FLOPs are the same every epoch: counts x per-call FLOPs
                m["perf/flops_cumulative"] = (m["epoch"] + 1) * per_epoch
            results[name].append(history)
    rows = ["| method | epochs | TFLOPs spent | wall-clock s | final eval reward, mean +- std over seeds |", "|---|---|---|---|---|"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, histories in results.items():
        evals = [[m for m in h if "eval/reward_mean" in m] for h in histories]
        n = min(len(e) for e in evals)  # evaluations that every seed reached (FLOPs per epoch do not depend on the seed)
        reward = np.array([[m["eval/reward_mean"] for m in e[:n]] for e in evals])  # (seeds, n)
        flops = np.array([m["perf/flops_cumulative"] for m in evals[0][:n]]) / 1e12
        seconds = np.array([[m["time/cumulative_s"] for m in e[:n]] for e in evals]).mean(0)
        final = reward[:, -1]
        rows.append(f"| {name} | {len(histories[0])} | {flops[-1]:.3f} | {seconds[-1]:.0f} | {final.mean():.3f} +- {final.std():.3f} |")
        for ax, x in zip(axes, (flops, seconds)):
            ax.plot(x, reward.mean(0), "o-", label=name)
            ax.fill_between(x, reward.min(0), reward.max(0), alpha=0.2)
    for ax, label in zip(axes, ("cumulative TFLOPs (sampling, decode + reward, update)", "cumulative wall-clock seconds")):
        ax.set_xlabel(label)
        ax.set_ylabel("eval reward (held-out prompts)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "comparison.png", dpi=120)
    plt.close(fig)
    report = (f"# Matched-compute comparison\n\nBudget {max_flops / 1e12:.3f} TFLOPs per run, {seeds} seeds, "
              f"reward '{args.reward}', model '{args.pretrained_model_name_or_path}'; bands span min to max over seeds.\n\n"
              + "\n".join(rows) + "\n\n![reward against compute and time](comparison.png)\n")
    (out / "comparison.md").write_text(report)
    print(report)


def parse(argv=None):
    parser = argparse.ArgumentParser(description="matched-compute comparison; other flags go to progrpo.py")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per method")
    parser.add_argument("--max_flops", type=float, default=5e12, help="FLOPs budget per run")
    ours, rest = parser.parse_known_args(argv)
    if ours.seeds < 1 or not ours.max_flops > 0:
        raise progrpo.RunError(f"--seeds must be at least 1 and --max_flops positive (got {ours.seeds}, {ours.max_flops})")
    return progrpo.parse_args(rest), ours.seeds, ours.max_flops


if __name__ == "__main__":
    try:
        compare(*parse())
    except progrpo.RunError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
