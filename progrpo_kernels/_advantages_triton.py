"""Triton half of advantages.py (the math and the zero-variance rule are documented there).

Triton design. N is at most a few hundred (prompts x group size), so this is a latency op, not a
bandwidth one; the point is to stay on the device with no host sync and no Python loop over groups.
The host maps ids to 0..n_groups-1 with torch.unique(return_inverse) and sorts members by group
(argsort, stable), giving each group a contiguous segment [start_g, start_g+1) of the sorted order.
Then two kernels:
  1. _group_stats_kernel: one program per segment loops over its members in fp32 and writes the
     group's mean and std (two passes, deterministic: no atomics, so the result is run-to-run exact).
     global_std runs it once more on the single segment [0, N), and the host gives that std to every
     group but the constant ones (std exactly 0, so their adv stays exactly 0).
  2. _normalize_kernel: elementwise over N, gathers its group's mean and std and writes adv.
Launch table: fp32 rewards and statistics, int64 indices (what torch.unique and argsort return), BLOCK
fixed; `compile_configs()` enumerates it for the compile test.
"""

import torch
import triton
import triton.language as tl

BLOCK = 128  # members per loop iteration / elements per normalize program; groups are ~8 to 48
NUM_WARPS = 4  # Triton's default, passed explicitly so that the compile test builds what runs
CONSTEXPRS = {"BLOCK": BLOCK}  # both kernels'


@triton.jit
def _group_stats_kernel(r_ptr, order_ptr, starts_ptr, mean_ptr, std_ptr, BLOCK: tl.constexpr):
    g = tl.program_id(0)
    start = tl.load(starts_ptr + g).to(tl.int32)  # N is at most a few thousand
    end = tl.load(starts_ptr + g + 1).to(tl.int32)
    n = (end - start).to(tl.float32)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    hi = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    lo = tl.full([BLOCK], float("inf"), dtype=tl.float32)
    for off in range(start, end, BLOCK):  # pass 1: sum, max, min
        idx = off + tl.arange(0, BLOCK)
        m = idx < end
        r = tl.load(r_ptr + tl.load(order_ptr + idx, mask=m, other=0), mask=m, other=0.0)
        total += r
        hi = tl.maximum(hi, tl.where(m, r, float("-inf")))
        lo = tl.minimum(lo, tl.where(m, r, float("inf")))
    mean = tl.sum(total, axis=0) / n
    sq = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(start, end, BLOCK):  # pass 2: squared deviations from the mean
        idx = off + tl.arange(0, BLOCK)
        m = idx < end
        r = tl.load(r_ptr + tl.load(order_ptr + idx, mask=m, other=0), mask=m, other=0.0)
        dev = tl.where(m, r - mean, 0.0)
        sq += dev * dev
    std = tl.sqrt(tl.sum(sq, axis=0) / n)
    std = tl.where(tl.max(hi, axis=0) == tl.min(lo, axis=0), 0.0, std)  # constant group: exactly 0
    tl.store(mean_ptr + g, mean)
    tl.store(std_ptr + g, std)


@triton.jit
def _normalize_kernel(r_ptr, inverse_ptr, mean_ptr, std_ptr, adv_ptr, N, eps, clip, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < N
    r = tl.load(r_ptr + i, mask=m, other=0.0)
    g = tl.load(inverse_ptr + i, mask=m, other=0)
    mean = tl.load(mean_ptr + g, mask=m, other=0.0)
    std = tl.load(std_ptr + g, mask=m, other=0.0)
    adv = tl.where(std == 0, 0.0, (r - mean) / (std + eps))
    adv = tl.minimum(tl.maximum(adv, -clip), clip)
    tl.store(adv_ptr + i, adv, mask=m)


def compile_configs():
    """Every (kernel, signature, constexprs, num_warps) group_advantages_triton can launch."""
    types = {"r_ptr": "*fp32", "order_ptr": "*i64", "starts_ptr": "*i64", "inverse_ptr": "*i64", "mean_ptr": "*fp32",
             "std_ptr": "*fp32", "adv_ptr": "*fp32", "N": "i32", "eps": "fp32", "clip": "fp32"}
    for kernel in (_group_stats_kernel, _normalize_kernel):
        signature = {n: "constexpr" if n in CONSTEXPRS else types[n] for n in kernel.arg_names}
        yield kernel, signature, CONSTEXPRS, NUM_WARPS


def group_advantages_triton(rewards, group_ids, eps, clip, global_std):
    r = rewards.detach().float().reshape(-1).contiguous()  # (N,)
    N, device = r.numel(), r.device
    _, inverse, counts = torch.unique(group_ids.reshape(-1).to(device), return_inverse=True, return_counts=True)
    num_groups = counts.numel()
    order = torch.argsort(inverse, stable=True)  # members sorted by group: contiguous segments
    starts = torch.zeros(num_groups + 1, dtype=torch.int64, device=device)
    starts[1:] = counts.cumsum(0)
    mean = torch.empty(num_groups, dtype=torch.float32, device=device)
    std = torch.empty(num_groups, dtype=torch.float32, device=device)
    _group_stats_kernel[(num_groups,)](r, order, starts, mean, std, **CONSTEXPRS, num_warps=NUM_WARPS)
    if global_std:  # the std of the single segment [0, N) for every group but the constant ones (std 0)
        all_starts = torch.tensor([0, N], dtype=torch.int64, device=device)
        all_order = torch.arange(N, device=device)
        std_all = torch.empty(1, dtype=torch.float32, device=device)
        _group_stats_kernel[(1,)](r, all_order, all_starts, torch.empty_like(std_all), std_all, **CONSTEXPRS,
                                  num_warps=NUM_WARPS)
        std = torch.where(std == 0, 0.0, std_all)
    adv = torch.empty(N, dtype=torch.float32, device=device)
    _normalize_kernel[(triton.cdiv(N, BLOCK),)](r, inverse, mean, std, adv, N, float(eps), float(clip),
                                                **CONSTEXPRS, num_warps=NUM_WARPS)
    return adv
