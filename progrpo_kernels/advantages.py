"""GRPO group advantages: normalise each reward within its group (the survivors of one prompt).

The math. Rewards R (N,), group ids (N,) (any integers, any group sizes, in any order):

    adv_i = clip( (R_i - mean_g) / (std_g + eps), -clip, clip )        g = group of i

with the population std (divide by n_g), eps = 1e-4 and clip = 5 by default (Flow-GRPO). A group whose
rewards are all equal (singletons included) has std exactly 0 and gets adv 0 for every member, never
NaN; "all equal" is tested as max == min, because a rounded fp32 mean can leave a tiny nonzero std.
global_std=True reproduces Flow-GRPO's baseline: mean per group, std over ALL N rewards; a constant group
still gets adv exactly 0 (its R_i - mean_g is round-off, which a global std would turn into |adv| ~1e-5).
Output fp32 (N,). Variances are two-pass (mean first, then squared deviations): rewards such as PickScore
sit near 22 with a spread below 1, where E[R^2] - E[R]^2 loses digits in fp32.

The Triton kernels are in _advantages_triton.py, imported the first time the Triton backend runs. The
first Triton call of a process is compared with the reference (see progrpo_kernels/__init__.py).
"""

import torch

from . import resolve_backend, self_check_pending, verify_against_reference

# Tolerance of fp32 advantages, used by the tests and by the first-use self-check alike: (R - mean) carries
# a few ulps of the reward scale, divided by (std_g + eps); a group of two close rewards amplifies it.
# Tolerance = ADV_ATOL + ADV_ULPS ulp(max |R|) / (std_g + eps), with ulp(r) taken as 2^-23 r.
ADV_ATOL = 1e-6
ADV_ULPS = 4


def _deviation_and_std(r, group_ids, global_std):
    """(R_i - mean_g, std_g), fp32 (N,) each, vectorised over groups; std exactly 0 for constant groups, also
    under global_std (where R_i - mean_g of a constant group is fp32 round-off, not a signal)."""
    _, inverse, counts = torch.unique(group_ids.reshape(-1).to(r.device), return_inverse=True, return_counts=True)
    num_groups = counts.numel()
    n = counts.float()  # (n_groups,)
    mean = torch.zeros(num_groups, device=r.device).index_add_(0, inverse, r) / n
    dev = r - mean[inverse]  # (N,)
    hi = torch.full((num_groups,), -torch.inf, device=r.device).scatter_reduce_(0, inverse, r, "amax")
    lo = torch.full((num_groups,), torch.inf, device=r.device).scatter_reduce_(0, inverse, r, "amin")
    if global_std:
        std = ((r - r.mean()) ** 2).mean().sqrt().expand(num_groups)  # one std over all N
    else:
        std = (torch.zeros(num_groups, device=r.device).index_add_(0, inverse, dev * dev) / n).sqrt()
    return dev, torch.where(hi == lo, 0.0, std)[inverse]  # exactly 0 for constant groups


def group_advantages_torch(rewards, group_ids, eps=1e-4, clip=5.0, global_std=False):
    """The spec: fp32 (N,) advantages, vectorised over groups (see module docstring)."""
    dev, std = _deviation_and_std(rewards.detach().float().reshape(-1), group_ids, global_std)
    adv = torch.where(std == 0, 0.0, dev / (std + eps))
    return adv.clamp(-clip, clip)


def adv_tolerance(max_abs_reward, std, eps):
    """The advantage tolerance: ADV_ATOL plus ADV_ULPS fp32 ulps of max|R|, scaled by 1 / (std + eps)."""
    return ADV_ATOL + ADV_ULPS * 2**-23 * max_abs_reward / (std + eps)


def _self_check(adv, rewards, group_ids, eps, clip, global_std):
    """First Triton call of the process: `adv` must equal the reference within ADV_ATOL + ADV_ULPS ulps.

    Cost, once per process: one torch evaluation of the reference (a few hundred rewards).
    """
    r = rewards.detach().float().reshape(-1)
    std = _deviation_and_std(r, group_ids, global_std)[1]
    tol = adv_tolerance(r.abs().max(), std, eps)  # (N,)
    ref = group_advantages_torch(rewards, group_ids, eps, clip, global_std)
    verify_against_reference("group_advantages", rewards.dtype, [("adv", adv, ref, 0.0, tol)])


def group_advantages(rewards, group_ids, eps=1e-4, clip=5.0, global_std=False, backend=None):
    """Per-group normalised, clipped advantages, fp32 (N,). backend: "triton", "torch" or None (env)."""
    if rewards.numel() != group_ids.numel():
        raise ValueError(f"rewards has {rewards.numel()} entries but group_ids has {group_ids.numel()}")
    if resolve_backend(rewards.device, backend) == "torch":
        return group_advantages_torch(rewards, group_ids, eps, clip, global_std)
    from ._advantages_triton import group_advantages_triton  # imports triton on first use

    adv = group_advantages_triton(rewards, group_ids, eps, clip, global_std)
    if self_check_pending("group_advantages"):
        _self_check(adv, rewards, group_ids, eps, clip, global_std)
    return adv
