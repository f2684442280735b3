"""Diagnostics of the paper's claims on a run: reward clustering (its Figure 1) and proxy fidelity.

Reads what progrpo.py writes. `python -m repro.diagnostics OUTPUT_DIR` prints, per epoch of
OUTPUT_DIR/prune_audit.jsonl, the share of trajectories whose group advantage |A| is below 0.5 and 0.1 in the
expanded group (the proxies at the first checkpoint) and among the trained survivors, and draws
OUTPUT_DIR/advantage_histogram.png.

Proxy fidelity (how well the one-step projection's reward at a checkpoint predicts the final one) needs the
final rewards of pruned trajectories, which training never computes. `audit_rollout` gets them by replaying
the same epoch without pruning: every trajectory draws its noise from its own generator, so a pruned member
unpruned is the trajectory it would have been (up to float round-off where model calls batch differently).
"""

import dataclasses
import json
import sys
from pathlib import Path

import torch

from progrpo import group_advantages, ovf_select, rollout


def audit_rollout(pipe, text, prompts, reward_fn, args, epoch, schedule):
    """A pruned rollout's audit with every pruned member's final reward filled in (a["audited"]), from an
    unpruned replay of the same epoch. Costs a full unpruned rollout: diagnostics only."""
    _, stats, audit = rollout(pipe, text, prompts, reward_fn, args, epoch, schedule)
    unpruned = dataclasses.replace(args, prune="none", ovf_after_sampling=0, uniform_after_sampling=0)
    full, _, _ = rollout(pipe, text, prompts, reward_fn, unpruned, epoch, [])
    finals = full["rewards"].view(len(prompts), -1)  # (B, G_max), members in order
    for p, a in enumerate(audit):
        a["audited"] = {m: finals[p, m].item() for m in range(args.group_size) if m not in a["survivors"]}
    return audit, stats


def clustering(audit):
    """cluster/* of one epoch's audit: the share of |A| < 0.5 and < 0.1 in the expanded group and the survivors."""
    expanded = torch.tensor([a["checkpoints"][0]["proxy"] if a["checkpoints"] else a["final"] for a in audit])
    survivors = torch.tensor([a["final"] for a in audit])
    return {f"cluster/{name}_abs_adv_lt_{delta}": small_advantage_fraction(r, delta)
            for name, r in (("expanded", expanded), ("survivors", survivors)) for delta in (0.5, 0.1)}


def small_advantage_fraction(rewards, delta):
    """Share of trajectories whose group advantage |A| < delta: the paper's reward clustering. (B, n) rewards."""
    B, n = rewards.shape
    adv = group_advantages(rewards.flatten(), torch.arange(B).repeat_interleave(n))
    return (adv.abs() < delta).float().mean().item()


def _ranks(values):
    """Ranks 0..n-1 with ties given their average rank (what Spearman's rho needs)."""
    values = torch.as_tensor(values, dtype=torch.float64)
    ranks = torch.empty_like(values)
    ranks[values.argsort()] = torch.arange(len(values), dtype=torch.float64)
    for v in values.unique():
        ranks[values == v] = ranks[values == v].mean()
    return ranks


def spearman(a, b):
    """Spearman's rank correlation (Pearson correlation of the ranks); NaN when either side is constant."""
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return ((ra * rb).sum() / (ra.norm() * rb.norm())).item()


def kendall(a, b):
    """Kendall's tau-b: (concordant - discordant pairs) / sqrt(pairs untied in a * pairs untied in b)."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    sa, sb = torch.sign(a[:, None] - a[None]).triu(1), torch.sign(b[:, None] - b[None]).triu(1)
    return ((sa * sb).sum() / ((sa != 0).sum() * (sb != 0).sum()).sqrt()).item()


def proxy_fidelity(audit, k):
    """How well checkpoint k's proxy rewards predicted the final ones, averaged over prompts.

    Uses the members whose final reward is known (survivors, plus pruned ones in a["audited"], which
    audit_rollout fills for every pruned member): rank correlations of proxy vs final, and the share of the kept
    set that OVF on the final rewards would also have kept (only where every member is known).
    """
    rho, tau, overlap = [], [], []
    for a in audit:
        c = a["checkpoints"][k]
        final = {**dict(zip(a["survivors"], a["final"])), **{int(m): r for m, r in a["audited"].items()}}
        known = [i for i, m in enumerate(c["members"]) if m in final]
        proxy, true = [c["proxy"][i] for i in known], [final[c["members"][i]] for i in known]
        if len(known) >= 3 and len(set(proxy)) > 1 and len(set(true)) > 1:  # a constant side has no ranking
            rho.append(spearman(proxy, true))
            tau.append(kendall(proxy, true))
        if len(known) == len(c["members"]):
            best = ovf_select(torch.tensor([final[m] for m in c["members"]]), len(c["kept"]))
            overlap.append(len({c["members"][i] for i in best.tolist()} & set(c["kept"])) / len(c["kept"]))
    return dict(spearman=mean_or_none(rho), kendall=mean_or_none(tau), overlap=mean_or_none(overlap))


def mean_or_none(values):
    """The mean, or None when there was nothing to measure."""
    return sum(values) / len(values) if values else None


def plot_advantage_histogram(audit_path, path):
    """The paper's Figure 1 on your run: advantages in the full (expanded) group vs in the trained survivors.

    The full group's rewards are the proxies at the first checkpoint (the final rewards when nothing is
    pruned), each group normalised on its own; most of its mass sits near 0, the survivors' does not.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    audit = [json.loads(line) for line in Path(audit_path).read_text().splitlines()]
    full = [a["checkpoints"][0]["proxy"] if a["checkpoints"] else a["final"] for a in audit]
    adv_full = torch.cat([group_advantages(torch.tensor(r), torch.zeros(len(r))) for r in full])
    adv_kept = torch.cat([group_advantages(torch.tensor(a["final"]), torch.zeros(len(a["final"]))) for a in audit])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = torch.linspace(-3, 3, 41).tolist()
    ax.hist(adv_full.tolist(), bins=bins, density=True, alpha=0.5, label=f"full group (G = {len(full[0])})")
    ax.hist(adv_kept.tolist(), bins=bins, density=True, alpha=0.5,
            label=f"trained survivors (K = {len(audit[0]['final'])})")
    ax.set_xlabel("normalised reward (advantage) within the group")
    ax.set_ylabel("density")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(output_dir):
    output_dir = Path(output_dir)
    audit = [json.loads(line) for line in (output_dir / "prune_audit.jsonl").read_text().splitlines()]
    for epoch in sorted({a["epoch"] for a in audit}):
        row = clustering([a for a in audit if a["epoch"] == epoch])
        print(json.dumps(dict(epoch=epoch, **row)))
    plot_advantage_histogram(output_dir / "prune_audit.jsonl", output_dir / "advantage_histogram.png")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "outputs/demo")
