"""Premise check: will pruning help on your model and reward, and where should it prune?

Pro-GRPO pays off only if two things hold on the base model: the one-step proxy at a checkpoint ranks a group's
trajectories roughly as their final rewards will (else OVF on the proxies keeps a near-random subset), and the
final rewards cluster (else the full group already teaches well). This measures both before any GPU-day is spent:

    python -m repro.premise demo                 # the digits model at the demo's settings (CPU, minutes)
    python -m repro.premise shapes               # the compositional shapes testbed (repro/shapes.py; CPU, minutes)
    python -m repro.premise sd35                 # run.sh's sd35 flags (GPU: SD3.5-M, PickScore, G = 48)
    python -m repro.premise sd14 --num_prompts 4 # SD-v1.4, T = 50: steps 5, 10, ..., 45 by default
    python -m repro.premise path/to/pipeline --reward my.module.Reward --prompts prompts.txt --num_steps 20
    bash run.sh premise sd35                     (run.sh fetches the preset's prompts first)

TARGET is a run.sh preset (demo or digits, shapes, sd35, sd35-flash, sd35-baseline, sd14, sd14-baseline, sd14-multi,
flux, flux-baseline; its flags are read from run.sh) or a diffusers folder / hub id, which needs --reward. Every
progrpo.py flag may follow and overrides the preset's (--group_size, --prune, --seed, --num_steps, --guidance_scale,
...); the check's own flags are --num_prompts, --continuations and --steps.

What it does, on the base model, with progrpo's own sampler (rollout, predict, sampler_step, project_x0, score):
  1. Prompts: the first --num_prompts of training's epoch-0 draw. Per prompt, progrpo.rollout samples the group
     unpruned with training's seeds, so members 0..G-1 are exactly the trajectories training's epoch 0 starts
     from; CLUSTER_POOL members in all, the extra ones only for the clustering at G = 48.
  2. At every measured step t (default 1..T-1), for the G members: the model output at x_t, the projection
     x0_hat = project_x0(x_t, output), decoded and scored: the proxy; and --continuations - 1 extra SDE
     continuations from x_t to the end (the member's own path is the first), each with its own seeded noise.
  3. Per group and step: proxy fidelity = Spearman(proxy_t, final); ceiling = Spearman between two
     continuations' finals (how much of the final reward x_t decides); kept-set ratio = Var(final on the
     proxies' OVF set of K) / Var(final on the finals' OVF set of K), against its chance level, the same ratio
     for a uniform random K-subset (exact expectation). K: the schedule's first survivor count (G / 2 if none).
  4. Clustering of the finals for G = 8, 16, 48 (see `clustering`), beside a Gaussian's shares at the same G.
  5. The suggested schedule (see `suggest_schedule`), and the preset's and the suggested schedules evaluated
     whole: the kept-set ratio of their final survivors (K_last of G) against chance.
Writes premise.md (the tables), premise.png (fidelity and ceiling per step; kept-set ratio and chance) and
premise.json (every reward measured) into --output_dir (default outputs/premise/TARGET), and a summary on stdout.

Why these measures. Spearman within a group, because OVF only ranks within a group. The kept-set ratio, not the
overlap of the kept sets: ovf_select breaks ties by member index, for proxies and finals alike, so in a group of
tied finals two kept sets overlap by construction; the variance of the final rewards kept does not depend on
which of several tied members was kept. The ratio is 1 for a proxy as good as the finals (static OVF) and
`chance` for a proxy that knows nothing; gain = (ratio - chance) / (1 - chance) puts those at 1 and 0.
Ceiling: if R = f(x_t) + independent noise, two continuations correlate Var(f) / Var(R), and the best
possible predictor of one final from x_t correlates the square root of that with it (for Pearson exactly, for
Spearman about): a fidelity far below sqrt(ceiling) says a better proxy could prune, a low ceiling says the
reward is not decided yet at t.
"""

import argparse
import dataclasses
import json
import math
import re
import shlex
import sys
import time
from pathlib import Path

import torch

import progrpo
from progrpo import RunError
from repro.diagnostics import spearman

ROOT = Path(__file__).resolve().parent.parent
PRESETS = ("demo", "shapes", "sd35", "sd35-flash", "sd35-baseline", "sd14", "sd14-baseline", "sd14-multi", "flux",
           "flux-baseline")  # run.sh's
ALIASES = {"digits": "demo"}
GPU_PRESETS = PRESETS[2:]
DEFAULT_PROMPTS = {"demo": 40, "shapes": 40, None: 8}  # --num_prompts: demo ~1 s a prompt on a CPU core
CLUSTER_SIZES = (8, 16, 48)  # group sizes the clustering is reported at
CLUSTER_POOL = max(CLUSTER_SIZES)  # trajectories sampled per prompt (at least G) for the clustering
MIN_GAIN = 0.5  # the rule: the proxies' kept set at least half-way from chance to the best subset ...
MIN_FIDELITY = 0.5  # ... and a fidelity at least half the best possible one (sqrt of the ceiling)
GAUSSIAN_GROUPS = 20000  # simulated Gaussian groups for the clustering's reference shares


# ---- The measures: pure functions of one group's rewards --------------------------------------------------

def subset_variance(final, kept):
    """Population variance of final[kept]."""
    return torch.as_tensor(final, dtype=torch.float64)[kept].var(correction=0).item()


def random_subset_variance(final, k):
    """E[Var(final[S])] over uniform random k-subsets S, exactly: ((k - 1) / k) (n / (n - 1)) Var(final), from
    the expected sample variance of a draw without replacement; population variances throughout."""
    final = torch.as_tensor(final, dtype=torch.float64)
    n = len(final)
    return (k - 1) / k * n / (n - 1) * final.var(correction=0).item()


def kept_set_ratio(final, kept):
    """(ratio, chance) for one group and a kept set: the final-reward variance of the kept members over that of the
    best subset of the same size (OVF on the finals), and the same for a uniform random subset of that size.
    (nan, nan) when the best subset has variance 0 (every final equal): nothing to keep, nothing to lose."""
    best = subset_variance(final, progrpo.ovf_select(final, len(kept)))
    if not best > 0:
        return math.nan, math.nan
    return subset_variance(final, kept) / best, random_subset_variance(final, len(kept)) / best


def kept_ratio(proxy, final, k):
    """kept_set_ratio of the proxies' OVF set of k: 1 for a proxy that ranks as the finals do (ties included)."""
    return kept_set_ratio(final, progrpo.ovf_select(proxy, k))


def schedule_kept(proxies, final, schedule):
    """kept_set_ratio of a whole schedule [(step, K), ...]: OVF on proxies[step] among the survivors at each
    checkpoint in turn, and the last survivors' final rewards against the best and a random subset of K_last."""
    live = torch.arange(len(final))
    for step, k in schedule:
        live = live[progrpo.ovf_select(torch.as_tensor(proxies[step])[live], k)]
    return kept_set_ratio(final, live)


def rank_corr(a, b):
    """Spearman's rho of a against the reference b within one group (ties get average ranks): nan when b is
    constant (nothing to rank: the group is left out), 0 when only a is (it tells nothing)."""
    if torch.as_tensor(b).unique().numel() == 1:
        return math.nan
    return 0.0 if torch.as_tensor(a).unique().numel() == 1 else spearman(a, b)


def mean_se(values):
    """(mean, standard error over groups, sd over groups, n) of the finite values; nan where too few."""
    v = torch.tensor([x for x in values if math.isfinite(x)], dtype=torch.float64)
    if len(v) == 0:
        return math.nan, math.nan, math.nan, 0
    sd = v.std(correction=1).item() if len(v) > 1 else math.nan
    return v.mean().item(), sd / math.sqrt(len(v)), sd, len(v)


def small_advantage_shares(groups):
    """(share of |A| < 0.5, share of |A| < 0.1, share of zero-std groups) of (n_groups, G) rewards, with
    progrpo.group_advantages (population std, eps 1e-4): what training computes."""
    n, size = groups.shape
    adv = progrpo.group_advantages(groups.flatten().float(), torch.arange(n).repeat_interleave(size)).abs()
    zero = (groups.max(1).values == groups.min(1).values).float().mean().item()
    return (adv < 0.5).float().mean().item(), (adv < 0.1).float().mean().item(), zero


def clustering(finals, sizes=CLUSTER_SIZES):
    """Per group size G' in `sizes`: each prompt's sampled finals (B, n), members in index order, cut into
    floor(n / G') disjoint blocks of G' consecutive members (members are i.i.d., so a block is a random group),
    the shares of small advantages and zero-std groups over all blocks, and a Gaussian's at the same G'
    (GAUSSIAN_GROUPS simulated groups, fixed seed). Sizes above n are left out."""
    rows = []
    g = torch.Generator().manual_seed(0)
    for size in sizes:
        blocks = finals.shape[1] // size
        if blocks == 0:
            continue
        groups = finals[:, :blocks * size].reshape(-1, size)
        lt05, lt01, zero = small_advantage_shares(groups)
        gauss05, gauss01, _ = small_advantage_shares(torch.randn(GAUSSIAN_GROUPS, size, generator=g))
        rows.append(dict(group_size=size, groups=len(groups), zero_std_groups=zero, abs_adv_lt_0_5=lt05,
                         abs_adv_lt_0_1=lt01, gaussian_lt_0_5=gauss05, gaussian_lt_0_1=gauss01))
    return rows


def ties(finals):
    """Share of final rewards equal to another in their group, and the share at the most common value (a
    reward's clamp or floor shows there), with that value; finals (B, G)."""
    tied = [(row[:, None] == row[None]).sum(1) > 1 for row in finals]
    values, counts = finals.flatten().unique(return_counts=True)
    return dict(tied_in_group=torch.cat(tied).float().mean().item(), mode_share=counts.max().item() / finals.numel(),
                mode_value=values[counts.argmax()].item())


def informed(row):
    """The rule for one step's row: kept-set gain >= MIN_GAIN and fidelity >= MIN_FIDELITY x sqrt(ceiling)."""
    ceiling = max(row["ceiling"], 0.0) if math.isfinite(row["ceiling"]) else 0.0
    return row["gain"] >= MIN_GAIN and row["fidelity"] >= MIN_FIDELITY * math.sqrt(ceiling)


def suggest_schedule(rows, keeps):
    """[(step, K), ...]: the earliest measured step from which every later measured step is informed, then
    the measured steps after it, one per survivor count in `keeps` (the schedule's K_1 > K_2 > ...). With
    fewer steps left than counts, the first counts are dropped (prune straight to the last ones); [] when
    the last measured step is not informed."""
    passed = [informed(r) for r in rows]
    first = next((j for j in range(len(rows)) if all(passed[j:])), len(rows))
    steps = [r["step"] for r in rows[first:]][:len(keeps)]
    return list(zip(steps, keeps[len(keeps) - len(steps):]))


def verdict(suggested, args, keeps):
    """One sentence on what the suggestion means for training."""
    if not suggested:
        return ("The proxy is informed at no measured step: pruning would keep near-random subsets; train the group "
                f"whole (--prune none), or static OVF on the final rewards (--prune none --ovf_after_sampling "
                f"{keeps[-1]}).")
    if nfe_saved(args, suggested) == 0:
        return (f"The proxy is informed only at step {suggested[0][0]} of {args.num_steps}, after the last model "
                "evaluation a pruning could save: pruning saves no sampling here; the expand-and-keep alternative is "
                f"static OVF on the final rewards (--prune none --ovf_after_sampling {keeps[-1]}).")
    return (f"The proxy is informed from step {suggested[0][0]} of {args.num_steps} on; pruning there saves "
            f"{nfe_saved(args, suggested):.0%} of sampling NFE.")


def prune_string(schedule):
    """[(5, 8), (7, 4)] -> '5:8,7:4'; [] -> 'none': what --prune takes."""
    return ",".join(f"{s}:{k}" for s, k in schedule) or "none"


def nfe_saved(args, schedule):
    """Share of sampling model evaluations a schedule saves against the unpruned group (progrpo.live_counts)."""
    return 1 - sum(progrpo.live_counts(args.num_steps, args.group_size, schedule)) / (args.num_steps * args.group_size)


# ---- Sampling: training's groups, proxies at every measured step, continuations from each x_t ---------------

@torch.no_grad()
def measure_prompt(pipe, prompt, p, reward_fn, args, steps, continuations):
    """One prompt's rewards: final (CLUSTER_POOL or G,) of the unpruned group (progrpo.rollout, epoch 0, batch
    position p: training's seeds), proxy (len(steps), G) and cont (len(steps), continuations - 1, G): the finals
    of the extra continuations of members 0..G-1 from x_t, seeded by (seed, 'premise', p, member/t/c)."""
    model = progrpo.denoiser(pipe)
    device, G, T = model.device, args.group_size, args.num_steps
    text = progrpo.encode_prompts(pipe, [prompt], args.max_sequence_length)
    pool = dataclasses.replace(args, group_size=max(G, CLUSTER_POOL), prune="none", ovf_after_sampling=0,
                               uniform_after_sampling=0)
    samples, _, _ = progrpo.rollout(pipe, text, [prompt], reward_fn, pool, 0, [], prompt_ids=[p])
    sched = progrpo.sampler_schedule(pipe, T, args.resolution, device)
    stats = dict(nfe=0, decodes=0)
    rows = len(steps) * G  # one row per (measured step, member), step-major
    x = samples["latents"][:G, steps].transpose(0, 1).reshape(rows, *samples["latents"].shape[2:])  # (rows, ...)
    i = torch.tensor(steps, device=device).repeat_interleave(G)  # (rows,) the step each row stands at
    text_row = torch.zeros(rows * continuations, dtype=torch.long, device=device)  # all rows: the prompt, row 0
    out = progrpo.predict(pipe, sched, i, x, text, text_row[:rows], args, args.sample_batch_size)
    x0_hat = progrpo.project_x0(sched, i, x, out)  # the proxy training would compute at a checkpoint here
    proxy = progrpo.score(pipe, x0_hat, [prompt] * rows, reward_fn, args, stats)[0].view(len(steps), G)
    n_extra = continuations - 1
    ones = [1] * (x.ndim - 1)  # latents of any rank (FLUX packs them into tokens)
    x, i, out = x.repeat(n_extra, *ones), i.repeat(n_extra), out.repeat(n_extra, *ones)  # continuation-major
    names = [f"{m}/{t}/{c}" for c in range(1, continuations) for t in steps for m in range(G)]
    generators = [torch.Generator(device).manual_seed(progrpo.trajectory_seed(args.seed, "premise", p, name))
                  for name in names]
    active = torch.arange(len(x), device=device)
    while len(active):  # every row steps from where it stands to T; rows branched late finish first
        noise = torch.stack([torch.randn(x.shape[1:], generator=generators[j], device=device) for j in active.tolist()])
        x[active] = progrpo.sampler_step(sched, i[active], out, x[active], args.noise_level, noise=noise)[0]
        i[active] += 1
        active = active[i[active] < T]
        if len(active):
            out = progrpo.predict(pipe, sched, i[active], x[active], text, text_row[active], args,
                                  args.sample_batch_size)
    cont = progrpo.score(pipe, x, [prompt] * len(x), reward_fn, args, stats)[0].view(n_extra, len(steps), G)
    return samples["rewards"].cpu(), proxy.cpu(), cont.transpose(0, 1).cpu()


def per_step_rows(finals, proxies, conts, steps, k, noise_left):
    """The per-step table from (B, n) finals, (B, S, G) proxies and (B, S, C - 1, G) continuation finals."""
    G = proxies.shape[2]
    rows = []
    for s, step in enumerate(steps):
        fid, ceil, ratio, chance = [], [], [], []
        for b in range(len(finals)):
            final = finals[b, :G]
            fid.append(rank_corr(proxies[b, s], final))
            runs = [final] + list(conts[b, s])  # the member's own path is the first continuation
            ceil.append(sum(rank_corr(runs[u], runs[v]) for u in range(len(runs)) for v in range(u))
                        / (len(runs) * (len(runs) - 1) / 2))
            r, c = kept_ratio(proxies[b, s], final, k)
            ratio.append(r)
            chance.append(c)
        f, r, c, q = mean_se(fid), mean_se(ratio), mean_se(chance), mean_se(ceil)
        gain = (r[0] - c[0]) / (1 - c[0]) if c[0] < 1 else math.nan
        row = dict(step=step, noise_left=noise_left[step], fidelity=f[0], fidelity_se=f[1], fidelity_sd=f[2],
                   fidelity_groups=f[3], ceiling=q[0], ceiling_se=q[1], ceiling_groups=q[3], kept_ratio=r[0],
                   kept_ratio_se=r[1], kept_groups=r[3], chance=c[0], gain=gain,
                   per_group=dict(fidelity=fid, ceiling=ceil, kept_ratio=ratio, chance=chance))
        row["informed"] = informed(row)
        rows.append(row)
    return rows


def evaluate_schedule(finals, proxies, steps, schedule):
    """mean kept ratio and chance of a whole schedule over the groups; proxies (B, S, G)."""
    G = proxies.shape[2]
    ratio, chance = [], []
    for b in range(len(finals)):
        by_step = {t: proxies[b, s] for s, t in enumerate(steps)}
        r, c = schedule_kept(by_step, finals[b, :G], schedule)
        ratio.append(r)
        chance.append(c)
    r, c = mean_se(ratio), mean_se(chance)
    return dict(prune=prune_string(schedule), kept_ratio=r[0], kept_ratio_se=r[1], chance=c[0], groups=r[3])


# ---- Outputs: premise.md, premise.png, premise.json, the summary -------------------------------------------

def fmt(value, digits=2):
    """A table cell: the number to `digits` places, or n/a (nothing measured, or nan)."""
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and math.isfinite(value) else "n/a"


def markdown(report):
    """premise.md: the setting, the per-step table, the clustering, the schedules, what each column means."""
    s, k, G = report["setting"], report["keep"], report["setting"]["group_size"]
    lines = [f"# Premise check: {report['target']}", "",
             f"{s['model']} with {s['reward']}; T = {s['num_steps']} steps, noise level {s['noise_level']}, "
             f"CFG {s['guidance_scale']}, {s['resolution']} px, precision {s['mixed_precision']}. "
             f"{s['prompts']} prompts x G = {G} (training's epoch-0 groups, seed {s['seed']}), "
             f"{s['continuations']} continuations from every measured x_t, {s['pool']} trajectories per prompt for "
             f"the clustering. {report['device']}; {report['seconds'] / 60:.1f} min.", "",
             "## Per step", "",
             f"| step t | noise left | fidelity | ceiling | sqrt(ceiling) | kept-set ratio (K = {k} of {G}) | chance "
             "| gain | informed |",
             "|---" * 9 + "|"]
    for r in report["steps"]:
        lines.append(f"| {r['step']} | {fmt(r['noise_left'])} | {fmt(r['fidelity'])} ± {fmt(r['fidelity_se'])} | "
                     f"{fmt(r['ceiling'])} ± {fmt(r['ceiling_se'])} | {fmt(math.sqrt(max(r['ceiling'], 0)))} | "
                     f"{fmt(r['kept_ratio'])} ± {fmt(r['kept_ratio_se'])} | {fmt(r['chance'])} | {fmt(r['gain'])} | "
                     f"{'yes' if r['informed'] else 'no'} |")
    lines += ["", "- **noise left**: sigma_t (flow) or sqrt(1 - alphas_cumprod_t) (DDIM) at x_t, after t steps.",
              "- **fidelity**: Spearman, within each group, of the proxy at t (project x_t with step t's model "
              "output, decode, score) against the trajectory's final reward; mean ± standard error over groups. "
              "A group whose finals are all equal is left out (premise.json counts the groups); a constant proxy "
              "counts as 0.",
              "- **ceiling**: Spearman, within each group, between the final rewards of independent SDE "
              "continuations from the same x_t: how much of the final reward x_t already decides. A perfect "
              "predictor from x_t would reach a fidelity of about sqrt(ceiling).",
              "- **kept-set ratio**: final-reward variance of the proxies' OVF set of K over that of the best "
              "K-subset (OVF on the finals); 1 = as good as static OVF. **chance**: the same for a uniform random "
              "K-subset (exact expectation). Groups whose finals are all equal have no ratio and are left out. "
              "**gain** = (ratio - chance) / (1 - chance): 0 = chance, 1 = static OVF.",
              f"- **informed**: gain >= {MIN_GAIN} and fidelity >= {MIN_FIDELITY} x sqrt(ceiling).", "",
              "## Clustering of the final rewards", "",
              "| G | groups | zero-std groups | \\|A\\| < 0.5 | Gaussian | \\|A\\| < 0.1 | Gaussian |",
              "|---" * 7 + "|"]
    for c in report["clustering"]:
        lines.append(f"| {c['group_size']} | {c['groups']} | {fmt(c['zero_std_groups'])} | "
                     f"{fmt(c['abs_adv_lt_0_5'])} | {fmt(c['gaussian_lt_0_5'])} | {fmt(c['abs_adv_lt_0_1'])} | "
                     f"{fmt(c['gaussian_lt_0_1'])} |")
    t = report["ties"]
    lines += ["", f"Each prompt's {s['pool']} sampled finals cut into disjoint blocks of G consecutive members "
              "(members are i.i.d., so a block is a random group); A = progrpo.group_advantages within a block. "
              "Gaussian: the "
              f"same shares for {GAUSSIAN_GROUPS} simulated groups of normal rewards. Ties: "
              f"{t['tied_in_group']:.0%} of the finals equal another in their group of {G}; "
              f"{t['mode_share']:.0%} sit at the most common value ({t['mode_value']:.4g}).", "",
              "## Schedule", "",
              f"Rule: the first checkpoint is the earliest measured step from which every later step is informed; "
              f"the next checkpoints are the measured steps right after it, one per survivor count of the schedule "
              f"({' -> '.join(str(x) for x in report['keeps'])}).", "",
              "| schedule | --prune | sampling NFE saved | kept-set ratio (final survivors) | chance |",
              "|---" * 5 + "|"]
    for name, e in report["schedules"].items():
        lines.append(f"| {name} | `{e['prune']}` | {e['nfe_saved']:.0%} | {fmt(e['kept_ratio'])} ± "
                     f"{fmt(e['kept_ratio_se'])} | {fmt(e['chance'])} |")
    lines += ["", f"**Suggested: `--group_size {G} --prune {report['suggested']}`**. {report['verdict']}", ""]
    return "\n".join(lines)


def json_safe(value):
    """The report with every nan or inf as null, so that any JSON reader takes premise.json."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def plot(report, path):
    """premise.png: fidelity, ceiling and sqrt(ceiling) per step; kept-set ratio and chance per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["steps"]
    t = [r["step"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    left.errorbar(t, [r["fidelity"] for r in rows], [r["fidelity_se"] for r in rows], marker="o", capsize=2,
                  label="fidelity: proxy vs final")
    left.errorbar(t, [r["ceiling"] for r in rows], [r["ceiling_se"] for r in rows], marker="s", capsize=2,
                  label="ceiling: continuations agree")
    left.plot(t, [math.sqrt(max(r["ceiling"], 0)) for r in rows], ls="--", color="grey", label="sqrt(ceiling)")
    left.set(xlabel="step t (checkpoint after t steps)", ylabel="Spearman within group", ylim=(-0.2, 1.02))
    right.errorbar(t, [r["kept_ratio"] for r in rows], [r["kept_ratio_se"] for r in rows], marker="o", capsize=2,
                   label="proxies' OVF set")
    right.plot(t, [r["chance"] for r in rows], ls="--", color="grey", label="random subset (chance)")
    right.set(xlabel="step t", ylabel=f"kept final variance / best (K = {report['keep']})", ylim=(0, 1.02))
    for step, _ in report["suggested_schedule"]:
        for ax in (left, right):
            ax.axvline(step, color="green", alpha=0.3)
    left.legend(fontsize=7)
    right.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"premise check: {report['target']} (suggested --prune {report['suggested']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary(report):
    """The stdout screen: the per-step table, clustering in one line per G, the schedules and the verdict."""
    lines = [f"premise check: {report['target']} ({report['setting']['prompts']} prompts x G = "
             f"{report['setting']['group_size']}, {report['seconds'] / 60:.1f} min on {report['device']})",
             f"{'t':>3} {'noise':>6} {'fidelity':>9} {'ceiling':>8} {'kept':>6} {'chance':>7} {'gain':>6}  informed"]
    for r in report["steps"]:
        lines.append(f"{r['step']:>3} {fmt(r['noise_left']):>6} {fmt(r['fidelity']):>9} {fmt(r['ceiling']):>8} "
                     f"{fmt(r['kept_ratio']):>6} {fmt(r['chance']):>7} {fmt(r['gain']):>6}  "
                     f"{'yes' if r['informed'] else 'no'}")
    for c in report["clustering"]:
        lines.append(f"clustering G = {c['group_size']}: |A| < 0.5 {c['abs_adv_lt_0_5']:.2f} (Gaussian "
                     f"{c['gaussian_lt_0_5']:.2f}), < 0.1 {c['abs_adv_lt_0_1']:.2f} ({c['gaussian_lt_0_1']:.2f}), "
                     f"zero-std groups {c['zero_std_groups']:.2f}")
    lines.append(f"ties: {report['ties']['tied_in_group']:.0%} of finals tied within their group, "
                 f"{report['ties']['mode_share']:.0%} at {report['ties']['mode_value']:.4g}")
    for name, e in report["schedules"].items():
        lines.append(f"{name}: --prune {e['prune']}: saves {e['nfe_saved']:.0%} NFE, kept ratio "
                     f"{fmt(e['kept_ratio'])} (chance {fmt(e['chance'])})")
    lines.append(f"=> --group_size {report['setting']['group_size']} --prune {report['suggested']}. "
                 f"{report['verdict']}")
    return "\n".join(lines)


# ---- Command line: the target (a run.sh preset or a model), progrpo's flags, the check's own -----------------

def run_sh_flags(preset, run_sh=ROOT / "run.sh", world=1):
    """The progrpo.py flags run.sh gives `preset`, read from run.sh: the block's `progrpo.py FLAGS "$@"` (demo) or
    `launch FETCH FLAGS "$@"`, with "${ARRAY[@]}" expanded from the array's definition and $((n * WORLD)) as n x
    world. Expects the block shapes run.sh has; a test keeps them readable."""
    text = re.sub(r"\$\(\(\s*(\d+)\s*\*\s*WORLD\s*\)\)", lambda m: str(int(m[1]) * world), Path(run_sh).read_text())
    block = re.search(rf"^\s*{re.escape(preset)}\)[^\n]*$(.*?)^\s*;;", text, re.S | re.M)
    command = block and re.search(r"(?:progrpo\.py|launch \S+)(.*?)\"\$@\"", block[1], re.S)
    if not command:
        raise RunError(f"cannot find the `{preset}` preset's progrpo.py flags in {run_sh}")

    def array(match):
        found = re.search(rf"^{match[1]}=\((.*?)\)[ \t]*(?:#[^\n]*)?$", text, re.S | re.M)
        if not found:
            raise RunError(f"cannot find the array {match[1]} in {run_sh}")
        return found[1]

    return shlex.split(re.sub(r'"\$\{(\w+)\[@\]\}"', array, command[1].replace("\\\n", " ")), comments=True)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (main), instead of argparse's usage block
        raise RunError(message)


def parse_args(argv=None):
    """(target, progrpo flags given, the check's options). progrpo's flags default to SUPPRESS: only those given
    override the target's."""
    parser = Parser(description=__doc__.split("\n")[0], usage="python -m repro.premise TARGET [--flag VALUE ...]")
    parser.add_argument("target", help="demo | digits | shapes | sd35 | sd35-flash | sd35-baseline | sd14 | "
                                       "sd14-baseline | sd14-multi | flux | flux-baseline | a diffusers folder or hub "
                                       "id (then --reward is needed)")
    parser.add_argument("--num_prompts", type=int, default=None,
                        help=f"prompts (groups) measured; default {DEFAULT_PROMPTS['demo']} on demo and shapes, "
                             f"{DEFAULT_PROMPTS[None]} otherwise")
    parser.add_argument("--continuations", type=int, default=2,
                        help="independent continuations from each measured x_t, the trajectory's own included")
    parser.add_argument("--steps", default="", help="measured steps 't,t,...' (default 1..T-1; for T > 10 every "
                                                    "(T // 10)-th step and the schedule's checkpoints)")
    for f in dataclasses.fields(progrpo.Args):
        kwargs = dict(default=argparse.SUPPRESS, help=f"progrpo.py's: {f.metadata['help'].replace('%', '%%')}")
        if f.type == "bool":
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, **kwargs)
        else:
            parser.add_argument(f"--{f.name}", type={"int": int, "float": float, "str": str}[f.type], **kwargs)
    opts = vars(parser.parse_args(argv))
    own = {k: opts.pop(k) for k in ("target", "num_prompts", "continuations", "steps")}
    return own, opts


def target_args(target, given):
    """progrpo.Args of the target with the given flags on top, and a name for the output folder."""
    preset = ALIASES.get(target, target)
    if preset in PRESETS:
        base, name = progrpo.parse_args(run_sh_flags(preset)), target
    else:
        if "reward" not in given:
            raise RunError(f"'{target}' is not a preset ({', '.join(PRESETS)}, digits): as a model it needs --reward "
                           "(a module.attr reward factory, e.g. repro.scorers.PickScore)")
        base, name = progrpo.Args(pretrained_model_name_or_path=target), Path(target.rstrip("/")).name
    output_dir = str(ROOT / "outputs" / "premise" / name)
    return dataclasses.replace(base, **{"output_dir": output_dir, **given})


def measured_steps(spec, num_steps, schedule):
    """The steps t measured: --steps, or 1..T-1, or for T > 10 every (T // 10)-th and the schedule's."""
    if not spec:
        every = max(1, num_steps // 10)
        return sorted(set(range(every, num_steps, every)) | {s for s, _ in schedule})
    try:
        steps = [int(s) for s in spec.split(",")]
    except ValueError:
        raise RunError(f"--steps {spec!r} is not a comma-separated list of steps (example: --steps 2,5,7)") from None
    progrpo.refuse([(steps != sorted(set(steps)) or not all(0 < s < num_steps for s in steps),
                     f"--steps {steps} must be strictly increasing and inside (0, {num_steps}): 0 < t < --num_steps")])
    return steps


def main(argv=None):
    own, given = parse_args(argv)
    args = target_args(own["target"], given)
    schedule = progrpo.validate(args)  # every flag, the model name and --output_dir, before anything loads
    G = args.group_size
    if own["num_prompts"] is None:
        own["num_prompts"] = DEFAULT_PROMPTS.get(ALIASES.get(own["target"], own["target"]), DEFAULT_PROMPTS[None])
    progrpo.refuse([(own["num_prompts"] < 1, f"--num_prompts must be at least 1 (got {own['num_prompts']})"),
                    (own["continuations"] < 2, f"--continuations must be at least 2 (got {own['continuations']}): "
                                               "the ceiling compares two"),
                    (G < 4, f"--group_size must be at least 4 for the premise check (got {G})")])
    steps = measured_steps(own["steps"], args.num_steps, schedule)
    # the survivor counts a schedule would keep: the target's, or halving twice (a preset that does not prune)
    keeps = [k for _, k in schedule] or [k for k in (G // 2, G // 4) if k >= 2]
    k = keeps[0]  # the first checkpoint's survivors: the per-step kept-set measure keeps as many
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and ALIASES.get(own["target"], own["target"]) in GPU_PRESETS:
        print(f"note: no GPU here; {own['target']}'s real model on a CPU takes hours (the CPU targets: demo, shapes)")
    train_prompts = progrpo.read_prompts(args.prompts, "--prompts")
    reward_fn = progrpo.build_reward(args.reward, device)
    pipe = progrpo.load_pipeline(args.pretrained_model_name_or_path, progrpo.DTYPES[args.mixed_precision],
                                 args.full_finetune).to(device)
    # training's epoch-0 draw (progrpo.main: one seeded permutation, a short prompt file repeats)
    g = torch.Generator().manual_seed(progrpo.trajectory_seed(args.seed, 0, "prompts", 0))
    pick = torch.randperm(len(train_prompts), generator=g)
    prompts = [train_prompts[pick[p % len(pick)]] for p in range(own["num_prompts"])]
    sched = progrpo.sampler_schedule(pipe, args.num_steps, args.resolution, device)
    noise_left = (sched["sigma"] if "sigma" in sched else (1 - sched["alpha_prod_t"]).sqrt()).tolist()
    pool = max(G, CLUSTER_POOL)
    extra = (own["continuations"] - 1) * G * sum(args.num_steps - t for t in steps)
    print(f"{own['target']}: {len(prompts)} prompts x G = {G}, T = {args.num_steps}, steps {steps}; per prompt "
          f"{pool * args.num_steps} + {len(steps) * G} + {extra} trajectory-steps (group, proxies, continuations)")
    start = time.time()
    finals, proxies, conts = [], [], []
    for p, prompt in enumerate(prompts):
        final, proxy, cont = measure_prompt(pipe, prompt, p, reward_fn, args, steps, own["continuations"])
        finals.append(final)
        proxies.append(proxy)
        conts.append(cont)
        print(f"  prompt {p + 1}/{len(prompts)} '{prompt}': {time.time() - start:.0f} s")
    finals, proxies, conts = torch.stack(finals).double(), torch.stack(proxies).double(), torch.stack(conts).double()

    rows = per_step_rows(finals, proxies, conts, steps, k, noise_left)
    suggested = suggest_schedule(rows, keeps)
    schedules = {}
    if schedule and all(s in steps for s, _ in schedule):
        schedules["as configured"] = dict(evaluate_schedule(finals, proxies, steps, schedule),
                                          nfe_saved=nfe_saved(args, schedule))
    if suggested:
        schedules["suggested"] = dict(evaluate_schedule(finals, proxies, steps, suggested),
                                      nfe_saved=nfe_saved(args, suggested))
    report = dict(target=own["target"], seconds=time.time() - start, keep=k, keeps=keeps,
                  device=torch.cuda.get_device_name(device) if device.type == "cuda"
                  else f"CPU, {torch.get_num_threads()} torch thread(s)",
                  setting=dict(model=args.pretrained_model_name_or_path, reward=args.reward, num_steps=args.num_steps,
                               noise_level=args.noise_level, guidance_scale=args.guidance_scale,
                               resolution=args.resolution, mixed_precision=args.mixed_precision, seed=args.seed,
                               prompts=len(prompts), group_size=G, continuations=own["continuations"], pool=pool,
                               steps=steps, prune=args.prune),
                  rule=f"gain >= {MIN_GAIN} and fidelity >= {MIN_FIDELITY} x sqrt(ceiling), at the first checkpoint "
                       "and every later measured step",
                  steps=rows, clustering=clustering(finals), ties=ties(finals[:, :G]), schedules=schedules,
                  suggested_schedule=suggested, suggested=prune_string(suggested),
                  verdict=verdict(suggested, args, keeps),
                  raw=dict(prompts=prompts, finals=finals.tolist(), proxies=proxies.tolist(),
                           continuations=conts.tolist()))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "premise.md").write_text(markdown(report))
    (out / "premise.json").write_text(json.dumps(json_safe(report), indent=1))
    plot(report, out / "premise.png")
    print(summary(report))
    print(f"done: {out / 'premise.md'}, {out / 'premise.png'}, {out / 'premise.json'}")
    return report


if __name__ == "__main__":
    try:
        main()
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
