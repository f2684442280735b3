"""The matched-compute comparison: GRPO, the expanded group trained in full, a uniform random subset of it, static
OVF and Pro-GRPO, each run until it has spent the same FLOPs (sampling, decode + reward calls, update), over a
small hyperparameter grid applied identically to every method and several seeds.

    python -m repro.compare [progrpo.py flags] --seeds 2 --max_flops 2e12 \
        --grid_learning_rate 1e-3,3e-4 --grid_clip_range 1e-2 --jobs 2 --diagnose_epochs 4     (bash run.sh compare)

1. Budget. Each method's FLOPs per epoch are counted once on the real model (repro.flops.call_flops x the
   schedule's counts), so its epochs = ceil(budget / FLOPs per epoch): every run ends at the first epoch at budget.
2. Grid. Every method trains at every (learning rate, clip range) of the grid, for every seed; a method's best
   setting is the one with the highest final eval reward (--eval_prompts), mean over seeds. The full grid is reported
   beside the best, so a reader sees how much of a gap is tuning.
3. Matched wall-clock, beside matched FLOPs: each run's eval reward interpolated (linearly, between its
   evaluations) at the same cumulative seconds of sampling + training (metrics' time/cumulative_s, which leaves
   out evaluation and model loading): the shortest run's total, so every run has reached it.
4. The paper's Figure 2 question: does the OVF subset beat the full group it was taken from, and a uniform random
   subset of the same size? static-ovf vs grpo-expanded and uniform-subset at equal updates (the same epochs: one
   update per epoch each) and at equal compute (1.).
5. Paired differences: Pro-GRPO minus each method, seed by seed at their best cells (a seed fixes the prompts
   drawn and the evaluation's noise), and the base model's eval reward per seed, where every run starts.
6. --methods picks the arms: the five of COMPARE_METHODS (default) or the ablations of Pro-GRPO (ABLATIONS: early
   and late checkpoints, G_max 32), `bash run.sh compare shapes-ablation`.
7. Diagnostics on the base model (--diagnose_epochs N): N epochs of Pro-GRPO rollouts replayed unpruned
   (repro.diagnostics.audit_rollout), giving proxy fidelity per pruning checkpoint, reward clustering and the
   paper's Figure 1 histogram.

A run whose output folder already holds a finished run of exactly the same flags (config.json's args, and one
metrics.jsonl line per epoch) is read back, not rerun, so an interrupted comparison resumes and the report can
be redrawn. Writes comparison.md, comparison.png, base-seed*.png (the base model's eval samples) and (with diagnostics)
advantage_histogram.png in --output_dir.
"""

import argparse
import dataclasses
import itertools
import json
import math
import multiprocessing
import signal
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

import progrpo
from repro.flops import call_flops, epoch_flops


def per_call_flops(args):
    """FLOPs per model call, decode, reward call and train step, counted on the real model. The methods differ only
    in group size and pruning, so one count serves them all."""
    device = torch.device("cpu")
    pipe = progrpo.load_pipeline(args.pretrained_model_name_or_path, progrpo.DTYPES[args.mixed_precision],
                                 args.full_finetune)
    progrpo.trainable_parameters(pipe, args)  # LoRA's matmuls count
    reward_fn = progrpo.build_reward(args.reward, device)
    prompt = progrpo.read_prompts(args.prompts)[0]
    text = progrpo.encode_prompts(pipe, [prompt], args.max_sequence_length)
    return call_flops(pipe, reward_fn, text, prompt, args)


def base_rewards(args, seeds, out):
    """The base model's eval reward for each seed (evaluation's ODE noise follows the seed): where every run starts."""
    pipe = progrpo.load_pipeline(args.pretrained_model_name_or_path, progrpo.DTYPES[args.mixed_precision],
                                 args.full_finetune)
    reward_fn = progrpo.build_reward(args.reward, torch.device("cpu"))
    prompts = progrpo.read_prompts(args.eval_prompts)[:args.num_eval_prompts]
    with torch.no_grad():
        return [progrpo.evaluate(pipe, reward_fn, prompts, dataclasses.replace(args, seed=seed),
                                 out / f"base-seed{seed}.png") for seed in range(seeds)]


def epoch_total_flops(args, per_call=None):
    """FLOPs of one epoch of `args`: the per-call FLOPs (counted here unless given) x the schedule's counts."""
    return epoch_flops(per_call or per_call_flops(args), args, progrpo.validate(args))["total"]


COMPARE_METHODS = {  # the demo task's five ways to spend the same compute (`bash run.sh compare`)
    "grpo": dict(group_size=8, prune="none"),  # plain GRPO at the baseline group size (Flow-GRPO: G = 24)
    "grpo-expanded": dict(group_size=16, prune="none"),  # the expanded group, sampled and trained in full
    "uniform-subset": dict(group_size=16, prune="none", uniform_after_sampling=4),  # sample 16, train a random 4
    "static-ovf": dict(group_size=16, prune="none", ovf_after_sampling=4),  # sample 16, train the max-variance 4
    "pro-grpo": dict(group_size=16, prune="5:8,7:4"),  # expand 16, prune to 8 then 4 inside the loop
}
ABLATIONS = {  # the paper's ablations of Pro-GRPO at a CPU budget (`bash run.sh compare shapes-ablation`)
    "pro-grpo-early": dict(group_size=16, prune="3:8,5:4"),  # checkpoints earlier than the paper's 5, 7 of 10
    "pro-grpo-late": dict(group_size=16, prune="7:8,8:4"),  # where the premise check finds the proxy informed
    "pro-grpo-g32": dict(group_size=32, prune="5:16,7:4"),  # G_max 32 (and 16 in pro-grpo), the same 4 trained
}
METHODS = {**COMPARE_METHODS, **ABLATIONS}
GRID_FLAGS = {"learning_rate": "lr", "clip_range": "clip"}  # the flags a grid may vary, and their short names


def grid_cells(grid):
    """Every combination of the grid's values, as dicts of progrpo.Args fields, in the order given."""
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def cell_name(cell):
    """'lr0.001-clip0.01': a grid cell as a folder name and table label."""
    return "-".join(f"{GRID_FLAGS[k]}{v:g}" for k, v in cell.items())


def finished_history(args):
    """The metrics of a finished run of exactly `args` in args.output_dir, or None (absent, other flags, cut short)."""
    out = Path(args.output_dir)
    if not ((out / "config.json").is_file() and (out / "metrics.jsonl").is_file()):
        return None
    wanted = json.loads(json.dumps(dataclasses.asdict(args)))  # as JSON stores it: tuples become lists
    if json.loads((out / "config.json").read_text()).get("args") != wanted:
        return None
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return history if len(history) == args.num_epochs else None


def train(args):
    """One run: progrpo.main unless a finished run of the same flags is there. In a worker process as well."""
    if finished_history(args) is None:
        progrpo.main(args)
    return finished_history(args)


def run_all(runs, jobs):
    """Histories of `runs` (name -> progrpo.Args), `jobs` at a time (separate processes; set OMP_NUM_THREADS=1).
    If a run fails or this process is stopped (Ctrl-C, SIGTERM), the queued runs are dropped and the running ones
    stopped at once: no worker goes on unseen. Finished runs are kept and read back on the next call."""
    if jobs == 1:
        return {key: train(run) for key, run in runs.items()}
    pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))  # no forked torch
    try:
        futures = {key: pool.submit(train, run) for key, run in runs.items()}
        return {key: f.result() for key, f in futures.items()}
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        for worker in multiprocessing.active_children():
            worker.terminate()
        raise
    finally:
        pool.shutdown()


def eval_curve(history, per_epoch):
    """A run's evaluations as arrays: epochs, cumulative FLOPs, cumulative seconds (sampling + training), reward."""
    evals = [m for m in history if "eval/reward_mean" in m]
    epochs = np.array([m["epoch"] for m in evals])
    seconds = np.array([m["time/cumulative_s"] for m in evals])
    return epochs, (epochs + 1) * per_epoch, seconds, np.array([m["eval/reward_mean"] for m in evals])


def reward_at_seconds(history, seconds):
    """Eval reward at `seconds` of cumulative sampling + training time, linear between evaluations."""
    _, _, t, reward = eval_curve(history, 1.0)
    return float(np.interp(seconds, t, reward))


def mean_std(values):
    """'0.123 +- 0.045': mean and population std over seeds."""
    return f"{np.mean(values):.3f} +- {np.std(values):.3f}"


def summarise(results, per_epoch):
    """Per (method, cell): final eval rewards over seeds and the matched-time rewards, at the common time horizon
    (the shortest run's total seconds, so that every run has reached it). results: (method, cell) -> histories."""
    horizon = min(h[-1]["time/cumulative_s"] for histories in results.values() for h in histories)
    table = {}
    for (name, cell), histories in results.items():
        table[name, cell] = dict(
            epochs=len(histories[0]), flops=len(histories[0]) * per_epoch[name],
            seconds=[h[-1]["time/cumulative_s"] for h in histories],
            final=[eval_curve(h, 1.0)[3][-1] for h in histories],
            at_horizon=[reward_at_seconds(h, horizon) for h in histories])
    best = {name: max((c for n, c in table if n == name), key=lambda c: np.mean(table[name, c]["final"]))
            for name in per_epoch}
    return table, best, horizon


FIGURE2 = ("grpo-expanded", "uniform-subset", "static-ovf")  # the full group, a uniform subset, the OVF subset


def figure2_rows(results, cells):
    """Figure 2's arms at equal updates: eval reward at every epoch each arm evaluated in every seed, and static-ovf
    minus uniform-subset and minus grpo-expanded ('-' for an arm not run)."""
    rows = []
    for cell in cells:
        curves = {n: [dict(zip(*eval_curve(h, 1.0)[::3])) for h in results[n, cell]] for n in FIGURE2
                  if (n, cell) in results}
        shared = sorted(set.intersection(*(set(c) for runs in curves.values() for c in runs)))
        for epoch in shared:
            values = {n: [c[epoch] for c in runs] for n, runs in curves.items()}
            columns = [mean_std(values[n]) if n in values else "-" for n in FIGURE2]
            for other in ("uniform-subset", "grpo-expanded"):  # static-ovf minus each
                gap = np.mean(values["static-ovf"]) - np.mean(values[other]) if other in values else None
                columns.append("-" if gap is None else f"{gap:+.3f}")
            rows.append(f"| {cell} | {epoch} | " + " | ".join(columns) + " |")
    return rows


def diagnose(args, epochs, out):
    """Proxy fidelity per pruning checkpoint, reward clustering and the Figure 1 histogram on the base model, from
    `epochs` epochs of Pro-GRPO rollouts (training's prompts for those epochs) each replayed unpruned. Markdown."""
    from repro import diagnostics

    args = dataclasses.replace(args, **COMPARE_METHODS["pro-grpo"])
    schedule = progrpo.validate(args)
    pipe = progrpo.load_pipeline(args.pretrained_model_name_or_path, progrpo.DTYPES[args.mixed_precision],
                                 args.full_finetune)
    reward_fn = progrpo.build_reward(args.reward, torch.device("cpu"))
    train_prompts = progrpo.read_prompts(args.prompts)
    audit = []
    for epoch in range(epochs):  # the prompts progrpo.main draws in this epoch
        g = torch.Generator().manual_seed(progrpo.trajectory_seed(args.seed, epoch, "prompts", 0))
        pick = torch.randperm(len(train_prompts), generator=g)
        prompts = [train_prompts[pick[i % len(pick)]] for i in range(args.prompts_per_epoch)]
        text = progrpo.encode_prompts(pipe, prompts, args.max_sequence_length)
        with torch.no_grad():
            epoch_audit, _ = diagnostics.audit_rollout(pipe, text, prompts, reward_fn, args, epoch, schedule)
        audit += [dict(epoch=epoch, **a) for a in epoch_audit]
    path = out / "diagnostics_audit.jsonl"
    path.write_text("".join(json.dumps(a) + "\n" for a in audit))
    diagnostics.plot_advantage_histogram(path, out / "advantage_histogram.png")
    rows = ["| checkpoint (step: live -> kept) | Spearman | Kendall tau-b | kept-set overlap with OVF on final "
            "rewards |", "|---|---|---|---|"]
    for k, (step, kept) in enumerate(schedule):
        f = diagnostics.proxy_fidelity(audit, k)
        live = len(audit[0]["checkpoints"][k]["members"])
        rows.append(f"| step {step}: {live} -> {kept} | " + " | ".join(
            "n/a" if f[m] is None else f"{f[m]:.3f}" for m in ("spearman", "kendall", "overlap")) + " |")
    cluster = diagnostics.clustering(audit)  # the expanded group by its proxies at the first checkpoint
    finals = torch.tensor([[{**dict(zip(a["survivors"], a["final"])), **{int(m): r for m, r in a["audited"].items()}}[m]
                            for m in range(args.group_size)] for a in audit])  # (B * epochs, G_max) final rewards
    cluster.update({f"cluster/expanded_final_abs_adv_lt_{d}": diagnostics.small_advantage_fraction(finals, d)
                    for d in (0.5, 0.1)})
    share = ", ".join(f"{k.removeprefix('cluster/')} {v:.2f}" for k, v in cluster.items())
    return (f"## Diagnostics on the base model\n\n{epochs} epochs x {args.prompts_per_epoch} prompts of Pro-GRPO "
            f"(G = {args.group_size}, prune {args.prune}), each replayed unpruned for every member's final reward "
            f"(seed {args.seed}).\n\nProxy fidelity (one-step projection's reward at the checkpoint vs the final "
            f"reward, mean over prompts):\n\n" + "\n".join(rows) + f"\n\nReward clustering (share of |A| below 0.5 "
            f"and 0.1; 'expanded' ranks by the step-{schedule[0][0]} proxies, 'expanded_final' by the final rewards): "
            f"{share}.\n\n![advantages, full group vs survivors](advantage_histogram.png)\n")


def paired_rows(table, best, reference="pro-grpo"):
    """Per method, `reference` minus it at both at their best cells, seed by seed (a seed fixes the prompts drawn
    and the eval prompts, so the difference pairs like with like): mean +- std and the seeds where it is > 0."""
    if reference not in best:
        return []
    rows = [f"| {reference} minus | at matched FLOPs | seeds > 0 | at matched wall-clock | seeds > 0 |",
            "|---|---|---|---|---|"]
    ref = table[reference, best[reference]]
    for name, cell in best.items():
        if name != reference:
            cells = []
            for key in ("final", "at_horizon"):
                gaps = np.subtract(ref[key], table[name, cell][key])
                cells += [f"{np.mean(gaps):+.3f} +- {np.std(gaps):.3f}", f"{int((gaps > 0).sum())} of {len(gaps)}"]
            rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return rows


def compare(args, seeds, max_flops, grid=None, jobs=1, diagnose_epochs=0, methods=None):
    """Runs every method of `methods` (name -> flag changes; default COMPARE_METHODS) at every cell of `grid` (flag ->
    values; default: args' own learning rate and clip range) for `seeds` seeds, each until it has spent `max_flops`,
    then writes comparison.md and reward-vs-FLOPs / reward-vs-time plots (each method at its best cell) into
    args.output_dir."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = grid or {k: [getattr(args, k)] for k in GRID_FLAGS}
    cells = grid_cells(grid)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    per_epoch, runs = {}, {}
    per_call = per_call_flops(args)  # the model, VAE and reward loaded once for all the methods
    methods = methods or COMPARE_METHODS
    for name, changes in methods.items():
        method = dataclasses.replace(args, **changes)
        per_epoch[name] = epoch_total_flops(method, per_call)
        method = dataclasses.replace(method, num_epochs=math.ceil(max_flops / per_epoch[name]))  # first at budget
        for seed, cell in itertools.product(range(seeds), cells):
            runs[name, cell_name(cell), seed] = dataclasses.replace(
                method, **cell, seed=seed, output_dir=str(out / name / f"{cell_name(cell)}-seed{seed}"))
    order = sorted(runs, key=lambda key: key[2])  # seed-major: an interrupted comparison has whole seeds
    histories = run_all({key: runs[key] for key in order}, jobs)
    results = {(n, c): [histories[n, c, s] for s in range(seeds)] for n, c, s in runs if s == 0}
    table, best, horizon = summarise(results, per_epoch)
    base = base_rewards(args, seeds, out)

    rows = ["| method | grid cell | epochs | TFLOPs | train s, mean | final eval reward | eval reward at "
            f"{horizon:.0f} s |", "|---|---|---|---|---|---|---|"]
    for (name, cell), r in table.items():
        mark = " **best**" if best[name] == cell and len(cells) > 1 else ""
        rows.append(f"| {name} | {cell}{mark} | {r['epochs']} | {r['flops'] / 1e12:.3f} | {np.mean(r['seconds']):.0f} "
                    f"| {mean_std(r['final'])} | {mean_std(r['at_horizon'])} |")
    best_rows = ["| method | best cell | final eval reward (matched FLOPs) | per seed | eval reward at "
                 f"{horizon:.0f} s (matched wall-clock) | per seed |", "|---|---|---|---|---|---|"]
    best_rows.append(f"| base model (no update) | - | {mean_std(base)} | {', '.join(f'{v:.3f}' for v in base)} | "
                     f"{mean_std(base)} | - |")
    for name, cell in best.items():
        r = table[name, cell]
        best_rows.append(f"| {name} | {cell} | {mean_std(r['final'])} | {', '.join(f'{v:.3f}' for v in r['final'])} "
                         f"| {mean_std(r['at_horizon'])} | {', '.join(f'{v:.3f}' for v in r['at_horizon'])} |")
    fig2 = ["| grid cell | epoch | grpo-expanded (16 trained) | uniform-subset (random 4 of 16) | static-ovf (OVF 4 of "
            "16) | static - uniform | static - expanded |", "|---|---|---|---|---|---|---|"]
    fig2 += figure2_rows(results, [cell_name(c) for c in cells]) if "static-ovf" in methods else []
    paired = paired_rows(table, best)

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, cell in best.items():
        curves = [eval_curve(h, per_epoch[name]) for h in results[name, cell]]
        n = min(len(c[0]) for c in curves)  # evaluations every seed reached (their epochs do not depend on the seed)
        reward = np.array([c[3][:n] for c in curves])  # (seeds, n)
        for ax, x in zip(axes, (curves[0][1][:n] / 1e12, np.mean([c[2][:n] for c in curves], axis=0))):
            ax.plot(x, reward.mean(0), "o-", label=f"{name} ({cell})")
            ax.fill_between(x, reward.min(0), reward.max(0), alpha=0.2)
    axes[1].axvline(horizon, color="grey", linestyle=":", label="matched wall-clock")
    for ax, label in zip(axes, ("cumulative TFLOPs (sampling, decode + reward, update)",
                                "cumulative seconds of sampling + training (mean over seeds)")):
        ax.set_xlabel(label)
        ax.set_ylabel(f"eval reward ({Path(args.eval_prompts).name})")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "comparison.png", dpi=120)
    plt.close(fig)
    grid_text = ", ".join(f"--{k} {' '.join(f'{v:g}' for v in values)}" for k, values in grid.items())
    report = (f"# Matched-compute comparison\n\nBudget {max_flops / 1e12:.3f} TFLOPs per run, {seeds} seeds, grid "
              f"{grid_text}, reward '{args.reward}', model '{args.pretrained_model_name_or_path}', trained on "
              f"'{args.prompts}', evaluated on the first {args.num_eval_prompts} lines of '{args.eval_prompts}'. "
              f"Mean +- std over "
              f"seeds; best cell = highest final eval reward, mean over seeds; plot bands span min to max over seeds."
              f"\n\n## Best cell per method\n\n" + "\n".join(best_rows)
              + ("\n\n## Paired differences (best cells, seed by seed)\n\n" + "\n".join(paired) if paired else "")
              + "\n\n## Full grid\n\n" + "\n".join(rows)
              + ("\n\n## Does the OVF subset beat its full group and a random subset? (equal updates)\n\n"
                 + "\n".join(fig2) if "static-ovf" in methods else "")
              + "\n\n![reward against compute and time](comparison.png)\n")
    if diagnose_epochs:
        report += "\n" + diagnose(args, diagnose_epochs, out)
    (out / "comparison.md").write_text(report)
    print(report)
    return table, best


def parse_list(text, flag):
    """'1e-3,3e-4' -> [0.001, 0.0003]; a RunError naming the flag otherwise."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise progrpo.RunError(f"{flag} takes a comma list of numbers such as 1e-3,3e-4 (got '{text}')") from None
    if not all(0 < v < math.inf for v in values):
        raise progrpo.RunError(f"{flag} values must be positive and finite (got '{text}')")
    return values


def parse(argv=None):
    parser = argparse.ArgumentParser(description="matched-compute comparison; other flags go to progrpo.py")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per method and grid cell")
    parser.add_argument("--max_flops", type=float, default=5e12, help="FLOPs budget per run")
    parser.add_argument("--grid_learning_rate", help="comma list of learning rates (default: --learning_rate)")
    parser.add_argument("--grid_clip_range", help="comma list of clip ranges (default: --clip_range)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, one process each")
    parser.add_argument("--methods", default=",".join(COMPARE_METHODS),
                        help=f"comma list of methods to run, from {', '.join(METHODS)}")
    parser.add_argument("--diagnose_epochs", type=int, default=0,
                        help="epochs of base-model rollouts for proxy fidelity and the Figure 1 histogram (0 = none)")
    ours, rest = parser.parse_known_args(argv)
    progrpo.refuse([(ours.seeds < 1, f"--seeds must be at least 1 (got {ours.seeds})"),
                    (not 0 < ours.max_flops < math.inf,
                     f"--max_flops must be positive and finite (got {ours.max_flops})"),
                    (ours.jobs < 1, f"--jobs must be at least 1 (got {ours.jobs})"),
                    (ours.diagnose_epochs < 0, f"--diagnose_epochs must be at least 0 (got {ours.diagnose_epochs})")])
    unknown = [m for m in ours.methods.split(",") if m not in METHODS]
    progrpo.refuse([(bool(unknown), f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")])
    methods = {m: METHODS[m] for m in ours.methods.split(",")}
    args = progrpo.parse_args(rest)
    grid = {"learning_rate": parse_list(ours.grid_learning_rate, "--grid_learning_rate")
            if ours.grid_learning_rate else [args.learning_rate],
            "clip_range": parse_list(ours.grid_clip_range, "--grid_clip_range")
            if ours.grid_clip_range else [args.clip_range]}
    for changes, cell in itertools.product(methods.values(), grid_cells(grid)):  # every run, before any model loads
        progrpo.validate(dataclasses.replace(args, **changes, **cell))
    return args, ours.seeds, ours.max_flops, grid, ours.jobs, ours.diagnose_epochs, methods


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # `kill` unwinds run_all as Ctrl-C
    try:
        compare(*parse())
    except progrpo.RunError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
