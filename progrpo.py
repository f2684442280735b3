"""Pro-GRPO: expand-and-prune GRPO for text-to-image flow and diffusion models, in one file.

Paper: Ge, Huang, Ai, Fan, Huang, He, "Expand and Prune: Maximizing Trajectory Diversity for Effective
GRPO in Generative Models", CVPR 2026, arXiv 2512.15347. No official code has been published; this is a
reference implementation. Where the paper is silent we follow the baselines it compares against:
Flow-GRPO (github yifan123/flow_grpo) for flow models (SD3.5-Medium) and DanceGRPO / DDPO for diffusion
models (SD-v1.4), and say so. The model family is read from the loaded pipeline.

Why. GRPO scores a group of G images per prompt and uses A_i = (R_i - mean) / std as the advantage.
Most rewards cluster near the group mean, so most trajectories get |A| ~ 0 and teach nothing, yet each
costs a full rollout. Pro-GRPO samples a larger group, predicts every trajectory's final reward cheaply
part-way through denoising, and keeps only the subset with the largest reward variance.

The algorithm, one epoch:
  1. Draw B prompts. For each, start G_max trajectories from independent noise (the expanded group).
  2. Denoise with a stochastic sampler (Flow-GRPO's SDE for flow models, DDIM with eta = 1 for
     diffusion models), keeping every latent x_t and the log-prob of every step.
  3. At each checkpoint t_k of the prune schedule (after t_k steps, before step t_k is taken), reuse the
     model output that step t_k needs anyway to project each live trajectory to its final sample in one
     step, decode it and score it: the proxy reward. No extra model call.
  4. Per prompt, keep the K_k trajectories whose proxy rewards have the largest variance (Optimal
     Variance Filtering, exact) and stop the others at once.
  5. Finish the survivors, decode, score: the true rewards R.
  6. Advantages A = (R - mean_S) / (std_S + 1e-4) over each prompt's K survivors, clipped to |A| <= 5.
  7. PPO-clip GRPO update on the survivors' stored steps, plus a KL penalty to the frozen base model.

Equations. Flow models (sigma runs from 1 = noise to 0 = data; x_sigma = (1 - sigma) x0 + sigma eps):
  SDE step      x_next = mean + std sqrt(-dt) z,  dt = sigma_next - sigma,  std = a sqrt(sigma / (1 - sigma'))
                mean   = x + v dt + std^2 / (2 sigma) (x + (1 - sigma) v) dt
  projection    x0_hat = x_t - sigma_t v_t        (the paper's x_T ~ x_{t_i} + (T - t_i) b_ODE)
Diffusion models (x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, a_t = alphas_cumprod[t], eps-prediction):
  DDIM step     x_next = mean + std z,  std = eta sqrt((1 - a_prev) / (1 - a_t) (1 - a_t / a_prev))
                mean   = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - std^2) eps
  projection    x0_hat = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)
Both:
  log-prob      log N(x_next; mean, step std^2) averaged over C*H*W
  OVF           S* = argmax_{|S| = K} Var({R_i : i in S}); the optimum is the j lowest and K - j highest
  loss          mean(max(-A r, -A clip(r, 1 - eps, 1 + eps))) + beta KL,  r = exp(logp_new - logp_old)

Where this departs from Flow-GRPO:
  1. Groups are expanded and pruned inside the sampling loop (the method); `--prune none` turns it off.
  2. Each trajectory draws its noise from its own generator seeded by (seed, epoch, prompt, member), so a
     survivor is the trajectory it would have been without pruning: bit for bit with one trajectory per
     model call, up to BLAS round-off (~1e-7) when micro-batches mix trajectories.
  3. Advantages are normalised within each prompt's survivors (Flow-GRPO: per-prompt mean and std over
     the same prompt's group as well; `--global_std` gives its batch-wide std variant).
  4. One PickScore preprocessing path on tensors (resize, crop, normalise on the device) instead of a
     round trip through PIL; the scores differ from the PIL path only by resampling round-off.
  5. Prompts per epoch are drawn by one seeded permutation, not by Flow-GRPO's distributed group sampler.
  6. Diffusion models follow DanceGRPO where Flow-GRPO does not apply: DDPO's DDIM log-prob (the last
     step ends at alphas_cumprod[0]), the trained steps of each trajectory in a random order, and
     `--full_finetune` (DanceGRPO's choice) with no KL term, as it has no frozen reference.

Glossary: B prompts per epoch, G group size (G_max expanded), K survivors, T denoising steps, x latents,
sigma / sigma_next noise levels, dt = sigma_next - sigma, a_t alphas_cumprod, v / eps / `out` model
output (velocity / noise), sched the sampler's per-step schedule, mean / std of a step,
logp_old (sampling) / logp_new (update), ratio, adv. Flattened minibatch tensors carry a `b_` prefix.

Run:
  bash run.sh                     # CPU demo: tiny random SD3 model, weight-free colour reward, minutes
  bash run.sh test                # the test suite
  bash run.sh sd35                # the paper's flow setting on GPUs (SD3.5-Medium, PickScore, 48 -> 24 -> 12)
  bash run.sh sd14                # the paper's diffusion setting (SD-v1.4, HPSv2.1, 48 -> 32 -> 8)
  python progrpo.py --help        # every flag, with its meaning
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import math
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

try:  # Triton kernels for the update's log-prob and the advantages; same numbers as the torch code here
    import kernels
except ImportError:
    kernels = None


# ----------------------------------------------------------------------------------------------------
# Config. Defaults are the paper's SD3.5-Medium Pro-GRPO setting (Flow-GRPO values where it is silent).
# ----------------------------------------------------------------------------------------------------

def arg(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Args:
    # TRY NOT TO MODIFY: run plumbing
    pretrained_model_name_or_path: str = arg("stabilityai/stable-diffusion-3.5-medium", "hub id or local folder of an SD3 or SD1.x pipeline; 'tiny' / 'tiny-sd1' build random-weight ones offline")
    output_dir: str = arg("outputs/progrpo", "where metrics.jsonl, prune_audit.jsonl, sample grids and LoRA weights go")
    seed: int = arg(0, "seeds prompt order and every trajectory's noise")
    mixed_precision: str = arg("fp16", "model weights dtype on GPU: no | fp16 | bf16 (step math and LoRA stay fp32; CPU always fp32)")
    prompts: str = arg("dataset/pickscore/train.txt", "training prompts, one per line; 'demo' = built-in colour prompts")
    eval_prompts: str = arg("dataset/pickscore/test.txt", "held-out prompts for evaluation; 'demo' = built-in colour prompts")
    num_eval_prompts: int = arg(16, "evaluate on the first N held-out prompts")
    num_epochs: int = arg(300, "epochs; each samples B prompts, prunes, and updates")
    eval_every: int = arg(10, "evaluate (ODE sampling, held-out prompts, sample grid) every N epochs; 0 = never")
    checkpointing_steps: int = arg(50, "write a resumable checkpoint every N epochs (weights are always saved at the end)")
    resume_from_checkpoint: str = arg("", "resume from 'latest' (newest complete checkpoint in --output_dir) or a checkpoint folder")
    # ALGO LOGIC: sampling
    resolution: int = arg(512, "image side in pixels")
    num_steps: int = arg(10, "T: SDE denoising steps per trajectory during training")
    eval_steps: int = arg(40, "ODE steps for evaluation")
    noise_level: float = arg(0.7, "flow models: SDE noise level a (Flow-GRPO 0.7); SD1.x: DDIM eta (DDPO/DanceGRPO 1.0)")
    guidance_scale: float = arg(4.5, "classifier-free guidance, used in sampling and in the update")
    max_sequence_length: int = arg(128, "T5 prompt tokens")
    prompts_per_epoch: int = arg(48, "B: prompts per epoch (Flow-GRPO: 48)")
    sample_batch_size: int = arg(16, "trajectories per transformer call while sampling (a CFG pair counts once)")
    decode_batch_size: int = arg(16, "latents per VAE decode")
    reward_batch_size: int = arg(16, "images per reward-model call")
    # ALGO LOGIC: expand and prune
    group_size: int = arg(48, "G_max: trajectories started per prompt")
    prune: str = arg("5:24,7:12", "checkpoints 'step:survivors,...' (prune after `step` steps), or 'none' for plain GRPO")
    ovf_after_sampling: int = arg(0, "static OVF: sample the whole group, keep the max-variance K for the update (0 = off)")
    reward: str = arg("pickscore", "reward name or weighted sum, e.g. 'pickscore:1.0,jpeg_compressibility:0.1'")
    # ALGO LOGIC: update
    learning_rate: float = arg(3e-4, "AdamW learning rate (Flow-GRPO LoRA: 3e-4)")
    adam_beta1: float = arg(0.9, "AdamW beta1")
    adam_beta2: float = arg(0.999, "AdamW beta2")
    adam_weight_decay: float = arg(1e-4, "AdamW weight decay")
    max_grad_norm: float = arg(1.0, "gradient clipping norm")
    train_batch_size: int = arg(4, "trajectories per update micro-batch")
    updates_per_epoch: int = arg(2, "optimiser steps per epoch; gradients accumulate over the micro-batches between them (Flow-GRPO: 2)")
    timestep_fraction: float = arg(0.99, "train the first int(T * fraction) steps of each trajectory (Flow-GRPO: 0.99 -> 9 of 10)")
    clip_range: float = arg(1e-4, "PPO ratio clip epsilon (Flow-GRPO: 1e-4; log-probs are means over C*H*W, so ratios move little)")
    adv_clip_max: float = arg(5.0, "advantages are clipped to [-adv_clip_max, adv_clip_max]")
    beta: float = arg(0.01, "KL penalty weight against the base model (adapter disabled)")
    global_std: bool = arg(False, "Flow-GRPO variant: per-prompt mean but std over the whole batch (over each rank's share under torchrun)")
    audit_fraction: float = arg(0.0, "diagnostics: finish this random share of pruned trajectories (untrained) to measure proxy fidelity")
    max_flops: float = arg(0.0, "stop once sampling + decode/reward + update have spent this many FLOPs (0 = run all epochs)")
    flops_only: bool = arg(False, "print the per-epoch FLOPs of run.sh's presets (SD3.5-M, SD-v1.4 on the meta device, no weights) beside the paper's Table 4, and exit")
    flops_configs: str = arg("configs", "folder of the published architecture configs used by --flops_only")
    compare: bool = arg(False, "run GRPO, expanded GRPO, static OVF and Pro-GRPO at a matched --max_flops budget and report")
    compare_seeds: int = arg(3, "seeds per method for --compare")
    full_finetune: bool = arg(False, "train every weight of the denoiser instead of LoRA (DanceGRPO for SD-v1.4; needs --beta 0)")
    ema: bool = arg(False, "keep an EMA of the trainable weights for evaluation and the saved weights (Flow-GRPO: decay 0.9, every 8 steps)")
    gradient_checkpointing: bool = arg(False, "recompute activations in the backward pass of the update (less memory, ~30% slower)")
    rank: int = arg(32, "LoRA rank")
    lora_alpha: int = arg(64, "LoRA alpha (scale = alpha / rank)")


def parse_args(argv=None) -> Args:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Args):
        if f.type == "bool":
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
        else:
            parser.add_argument(f"--{f.name}", type={"int": int, "float": float, "str": str}[f.type], default=f.default, help=f.metadata["help"])
    return Args(**vars(parser.parse_args(argv)))


class RunError(Exception):
    """A problem the user can fix (bad flag, missing file, NaN reward): printed as one line, exit code 2."""


# ----------------------------------------------------------------------------------------------------
# ALGO LOGIC: the pure math. All of it runs in fp32, whatever the model dtype (bf16 overflows the mean).
# ----------------------------------------------------------------------------------------------------

def _per_sample(value, like):
    """(B,) schedule values -> (B, 1, 1, 1) so they broadcast over a latent batch."""
    return value.to(torch.float32).view(-1, *([1] * (like.ndim - 1)))


def gaussian_logprob(sample, mean, std):
    """log N(sample; mean, std^2) per element, constants included, averaged (not summed) over C*H*W as
    Flow-GRPO and DDPO do. The sample is data: no gradient flows into it."""
    return (-((sample.detach().float() - mean) ** 2) / (2 * std**2) - torch.log(std)
            - 0.5 * math.log(2 * math.pi)).mean(dim=tuple(range(1, mean.ndim)))


def flow_std(sigma, sigma_next, noise_level):
    """Flow-GRPO's per-step noise scale std_t = a sqrt(sigma / (1 - sigma')), (B,) fp32.

    sigma' = sigma, except at sigma = 1 (the first step) where 1 - sigma = 0: there sigma' = sigma_next.
    """
    sigma, sigma_next = sigma.to(torch.float32), sigma_next.to(torch.float32)
    return noise_level * torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_next, sigma)))


def sde_step_with_logprob(v, x, sigma, sigma_next, noise_level, prev_sample=None, noise=None):
    """One Flow-GRPO SDE step from noise level sigma to sigma_next, and the log-prob of the step taken.

    v, x: (B, C, H, W) model output and latent; sigma, sigma_next: (B,) tensors; noise_level: float a.
    Give prev_sample to score a stored step (the update), or noise ~ N(0, 1) to draw a new one.
    Returns (prev_sample, log_prob (B,), prev_sample_mean, std_dev_t (B,)); log_prob is None when a = 0,
    which is the plain Euler ODE step x + v dt used for evaluation.
    """
    v, x = v.float(), x.float()
    std_dev_t = _per_sample(flow_std(sigma, sigma_next, noise_level), x)
    sigma, sigma_next = _per_sample(sigma, x), _per_sample(sigma_next, x)
    dt = sigma_next - sigma  # < 0: sigma decreases towards the data
    # drift of the reverse SDE whose marginals match the flow ODE's: Euler plus a score correction
    mean = x + v * dt + std_dev_t**2 / (2 * sigma) * (x + (1 - sigma) * v) * dt
    step_std = std_dev_t * torch.sqrt(-dt)  # the Brownian increment over |dt|
    if prev_sample is None:
        prev_sample = mean if noise_level == 0 else mean + step_std * noise.float()
    log_prob = gaussian_logprob(prev_sample, mean, step_std) if noise_level != 0 else None
    return prev_sample, log_prob, mean, std_dev_t.view(-1)


def project_x0_flow(x, v, sigma):
    """One-step ODE projection to the final sample: x0_hat = x_sigma - sigma v (exact if v were constant)."""
    return x.float() - _per_sample(sigma, x) * v.float()


def ddim_step_with_logprob(eps, x, alpha_prod_t, alpha_prod_t_prev, eta, prev_sample=None, noise=None):
    """One DDIM step (DDPO's ddim_step_with_logprob) and the log-prob of the step taken.

    eps, x: (B, C, H, W) predicted noise and latent; alpha_prod_t, alpha_prod_t_prev: (B,) cumulative
    alphas at t and at prev_t = t - 1000 / T (clamped at 0, so the last step ends at alphas_cumprod[0]).
    eta = 1 is DDPM-like ancestral sampling, eta = 0 deterministic DDIM (no log-prob).
    Returns (prev_sample, log_prob (B,), prev_sample_mean, std_dev_t (B,)).
    """
    eps, x = eps.float(), x.float()
    a_t, a_prev = _per_sample(alpha_prod_t, x), _per_sample(alpha_prod_t_prev, x)
    x0_hat = project_x0_ddim(x, eps, alpha_prod_t)
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std_dev_t = eta * variance.sqrt()
    mean = a_prev.sqrt() * x0_hat + (1 - a_prev - std_dev_t**2).sqrt() * eps
    if prev_sample is None:
        prev_sample = mean if eta == 0 else mean + std_dev_t * noise.float()
    log_prob = gaussian_logprob(prev_sample, mean, std_dev_t) if eta != 0 else None
    return prev_sample, log_prob, mean, std_dev_t.view(-1)


def project_x0_ddim(x, eps, alpha_prod_t):
    """One-step projection for eps-prediction: x0_hat = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)."""
    a_t = _per_sample(alpha_prod_t, x)
    return (x.float() - (1 - a_t).sqrt() * eps.float()) / a_t.sqrt()


def ovf_select(rewards, k):
    """Optimal Variance Filtering: indices of the size-k subset with the largest (population) variance.

    A max-variance subset is always the j lowest and the k - j highest rewards for some j (an interior
    member swapped for an outside value farther from the subset mean raises the variance), so sort once
    and scan j with prefix sums: O(G log G), exact. Ties prefer j closest to k / 2, then the smaller j;
    equal rewards are ordered by index. Returns the kept indices in increasing order.
    """
    rewards = torch.as_tensor(rewards, dtype=torch.float64).flatten().cpu()
    n = rewards.numel()
    if not 1 <= k <= n:
        raise ValueError(f"cannot keep {k} of {n} trajectories")
    order = torch.sort(rewards, stable=True).indices  # stable: equal rewards keep index order
    r = rewards[order] - rewards.mean()  # centring keeps E[r^2] - E[r]^2 free of cancellation
    csum = torch.cat([r.new_zeros(1), r.cumsum(0)])
    csq = torch.cat([r.new_zeros(1), (r * r).cumsum(0)])
    j = torch.arange(k + 1)  # j lowest + (k - j) highest
    total = csum[j] + (csum[n] - csum[n - k + j])
    total_sq = csq[j] + (csq[n] - csq[n - k + j])
    var = (total_sq / k - (total / k) ** 2).tolist()
    # equal up to float round-off counts as a tie; ties go to j closest to k / 2, then the smaller j
    tied = [jj for jj in range(k + 1) if var[jj] >= max(var) * (1 - 1e-9)]
    best = min(tied, key=lambda jj: (abs(2 * jj - k), jj))
    kept = torch.cat([order[:best], order[n - k + best:]])
    return torch.sort(kept).values


def group_advantages(rewards, group_ids, eps=1e-4, clip=5.0, global_std=False):
    """A_i = (R_i - mean_g) / (std_g + eps) within each group g, population std; clipped to |A| <= clip.

    A group whose rewards are all equal gets exactly 0, never NaN. It is detected as max == min, not as
    std == 0: the fp32 mean of equal values need not equal them, which would leave a std of ~1e-6.
    global_std=True is Flow-GRPO's variant: per-group mean, std over all rewards. Returns fp32 (N,).
    """
    rewards = rewards.to(torch.float32)
    _, gid = torch.unique(group_ids, return_inverse=True)  # (N,) group index 0..n_groups-1
    zeros = torch.zeros(int(gid.max()) + 1, device=rewards.device)
    count = zeros.index_add(0, gid, torch.ones_like(rewards))
    centred = rewards - (zeros.index_add(0, gid, rewards) / count)[gid]
    if global_std:
        std = torch.where(rewards.max() == rewards.min(), 0.0, rewards.std(correction=0)).expand_as(rewards)
    else:
        hi = torch.full_like(zeros, -math.inf).scatter_reduce(0, gid, rewards, "amax")
        lo = torch.full_like(zeros, math.inf).scatter_reduce(0, gid, rewards, "amin")
        std = torch.where(hi == lo, 0.0, (zeros.index_add(0, gid, centred**2) / count).sqrt())[gid]
    adv = torch.where(std == 0, 0.0, centred / (std + eps))
    return adv.clamp(-clip, clip)


def parse_prune_schedule(spec, num_steps, group_size):
    """'5:24,7:12' -> [(5, 24), (7, 12)]; 'none' -> []. Raises ValueError with a one-line reason."""
    if group_size < 2:
        raise ValueError(f"--group_size must be at least 2 (got {group_size}): GRPO needs a group to compare within")
    if spec.strip().lower() in ("", "none"):
        return []
    schedule = []
    for item in spec.split(","):
        try:
            step, keep = (int(s) for s in item.split(":"))
        except ValueError:
            raise ValueError(f"--prune item '{item}' is not 'step:survivors' (example: --prune 5:24,7:12)") from None
        schedule.append((step, keep))
    steps, keeps = [s for s, _ in schedule], [k for _, k in schedule]
    if any(not 0 < s < num_steps for s in steps) or steps != sorted(set(steps)):
        raise ValueError(f"--prune checkpoints {steps} must be strictly increasing and inside (0, {num_steps})")
    if any(a <= b for a, b in zip([group_size] + keeps, keeps)):
        raise ValueError(f"--prune survivors {keeps} must strictly decrease from --group_size {group_size}")
    if keeps[-1] < 2:
        raise ValueError(f"--prune must keep at least 2 survivors per prompt (got {keeps[-1]})")
    return schedule


def live_counts(num_steps, group_size, schedule):
    """Trajectories alive when step i is evaluated; their sum is the transformer evaluations per group."""
    alive, keep_at = [], dict(schedule)
    n = group_size
    for i in range(num_steps):
        alive.append(n)  # step i's velocity is computed for every live trajectory; the projection reuses it
        n = keep_at.get(i, n)  # then the survivors take step i
    return alive


def ppo_clip_loss(logp_new, logp_old, adv, clip_range):
    """Flow-GRPO's clipped surrogate on (B,) log-probs; returns (loss, ratio)."""
    ratio = torch.exp(logp_new - logp_old)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped).mean(), ratio


# The sampler's schedule is a dict of (T,) tensors indexed by step: `sigma`, `sigma_next` for flow
# models, `alpha_prod_t`, `alpha_prod_t_prev` for DDIM. These three functions are the only places that
# look at which; `i` is a (N,) tensor of step indices, one per trajectory.

def sampler_step(sched, i, out, x, noise_level, prev_sample=None, noise=None):
    """The family's step: Flow-GRPO SDE (noise_level = a) or DDPO DDIM (noise_level = eta)."""
    if "sigma" in sched:
        return sde_step_with_logprob(out, x, sched["sigma"][i], sched["sigma_next"][i], noise_level, prev_sample, noise)
    return ddim_step_with_logprob(out, x, sched["alpha_prod_t"][i], sched["alpha_prod_t_prev"][i], noise_level, prev_sample, noise)


def project_x0(sched, i, x, out):
    """The family's one-step projection to the final sample."""
    if "sigma" in sched:
        return project_x0_flow(x, out, sched["sigma"][i])
    return project_x0_ddim(x, out, sched["alpha_prod_t"][i])


def step_logprob(sched, i, out, x, x_next, noise_level, out_ref=None):
    """Log-prob of stored steps x -> x_next under the current model output, and the KL to out_ref.

    KL of two Gaussians with the same std: mean over C*H*W of (mean - mean_ref)^2 / (2 std^2), with the
    flow std taken without its sqrt(-dt) factor (Flow-GRPO). The fused kernels compute the same numbers.
    """
    if kernels is None:
        return step_logprob_torch(sched, i, out, x, x_next, noise_level, out_ref)
    if "sigma" in sched:
        sigma, sigma_next = sched["sigma"][i], sched["sigma_next"][i]
        return kernels.sde_logprob(out, x, x_next, sigma, sigma_next, flow_std(sigma, sigma_next, noise_level), v_ref=out_ref)
    return kernels.ddim_logprob(out, x, x_next, sched["alpha_prod_t"][i], sched["alpha_prod_t_prev"][i], noise_level, eps_ref=out_ref)


def step_logprob_torch(sched, i, out, x, x_next, noise_level, out_ref=None):
    """step_logprob in plain eager PyTorch: the step function's log-prob, and the KL from a second mean."""
    _, logp, mean, std = sampler_step(sched, i, out, x, noise_level, prev_sample=x_next)
    if out_ref is None:
        return logp, None
    mean_ref = sampler_step(sched, i, out_ref, x, noise_level, prev_sample=x_next)[2]
    return logp, ((mean - mean_ref) ** 2).mean(dim=(1, 2, 3)) / (2 * std**2)


# ----------------------------------------------------------------------------------------------------
# Rewards. One interface: images (N, 3, H, W) in [0, 1] and N prompts -> (N,) fp32 rewards.
# ----------------------------------------------------------------------------------------------------

COLOURS = {"red": 0, "green": 1, "blue": 2}


def colour_reward(images, prompts):
    """Weight-free demo reward: how much the prompt's colour word dominates the image, in [-1, 1].

    Mean over pixels of (target channel - mean of the other two). It depends on the prompt, so the model
    has to read the text to raise it, and it varies smoothly with the latent, so groups spread.
    """
    target = torch.tensor([next((c for w, c in COLOURS.items() if w in p.lower()), -1) for p in prompts])
    if (target < 0).any():
        raise RunError(f"the colour reward needs a colour word ({', '.join(COLOURS)}) in every prompt; "
                       f"'{prompts[int((target < 0).nonzero()[0])]}' has none")
    channel_means = images.float().mean(dim=(2, 3))  # (N, 3)
    own = channel_means.gather(1, target.to(images.device)[:, None]).squeeze(1)
    return 1.5 * own - 0.5 * channel_means.sum(1)  # own - mean(other two)


def jpeg_size_kb(images):
    """DDPO's compressibility measure: size of each uint8 image saved as JPEG quality 95, in kB."""
    sizes = []
    for img in (images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy():
        buffer = io.BytesIO()
        Image.fromarray(img).save(buffer, format="JPEG", quality=95)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes)


def jpeg_compressibility(images, prompts):
    return -jpeg_size_kb(images)


def jpeg_incompressibility(images, prompts):
    return jpeg_size_kb(images)


def clip_preprocess(images, size, mean, std):
    """CLIP preprocessing on tensors: bicubic resize of the short side to `size`, centre crop, normalise."""
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    images = F.interpolate(images.float(), size=(max(size, round(h * scale)), max(size, round(w * scale))),
                           mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    top, left = (images.shape[-2] - size) // 2, (images.shape[-1] - size) // 2
    images = images[..., top:top + size, left:left + size]
    return (images - torch.tensor(mean, device=images.device).view(1, 3, 1, 1)) / torch.tensor(std, device=images.device).view(1, 3, 1, 1)


def clip_cosine(model, pixels, text_inputs):
    """(N,) cosine of a transformers CLIPModel's image and text embeddings; text_inputs: tokenizer output."""
    image_embeds = model.get_image_features(pixel_values=pixels)
    text_embeds = model.get_text_features(**text_inputs)
    # transformers 5 returns model outputs whose pooler_output is the projected embedding; 4.x a tensor
    image_embeds, text_embeds = (e if torch.is_tensor(e) else e.pooler_output for e in (image_embeds, text_embeds))
    return (F.normalize(image_embeds, dim=-1) * F.normalize(text_embeds, dim=-1)).sum(-1)


class ClipScore:
    """A CLIP model through transformers scoring image-prompt agreement: cos(image, text) embeddings.

    PickScore (Kirstain et al. 2023, a CLIP-H fine-tuned on Pick-a-Pic preferences) multiplies by the
    model's logit scale: a typical SD3.5-M image scores ~22. Flow-GRPO trains on PickScore / 26;
    advantages are scale-free, so we keep the paper's raw units. CLIP score is the plain cosine.
    """

    def __init__(self, device, model, processor, logit_scaled):
        from transformers import AutoProcessor, CLIPModel

        self.processor = AutoProcessor.from_pretrained(processor)
        self.model = CLIPModel.from_pretrained(model).eval().requires_grad_(False).to(device)
        self.logit_scaled = logit_scaled

    @torch.no_grad()
    def __call__(self, images, prompts):
        device, config = self.model.device, self.processor.image_processor
        pixels = clip_preprocess(images.to(device), config.crop_size["height"], config.image_mean, config.image_std)
        text = self.processor.tokenizer(prompts, padding="max_length", truncation=True, max_length=77, return_tensors="pt").to(device)
        cos = clip_cosine(self.model, pixels, text)
        return (self.model.logit_scale.exp() * cos if self.logit_scaled else cos).float().cpu()


def PickScore(device, model="yuvalkirstain/PickScore_v1", processor="laion/CLIP-ViT-H-14-laion2B-s32B-b79K"):
    return ClipScore(device, model, processor, logit_scaled=True)


def CLIPScore(device, model="openai/clip-vit-large-patch14", processor="openai/clip-vit-large-patch14"):
    return ClipScore(device, model, processor, logit_scaled=False)


class HPSv2:
    """HPSv2.1 (Wu et al. 2023): open_clip ViT-H-14 fine-tuned on human preference pairs; score = cos.

    A typical SD-v1.4 image scores ~0.25 (the paper: DanceGRPO 0.369, Pro-GRPO 0.391 after training).
    open_clip is imported here, so the package is needed only when this reward is used.
    """

    def __init__(self, device, checkpoint=None, arch="ViT-H-14"):
        try:
            import open_clip
        except ImportError:
            raise RunError("the hpsv2 reward needs open_clip: pip install open_clip_torch") from None
        if checkpoint is None:
            from huggingface_hub import hf_hub_download

            checkpoint = hf_hub_download("xswu/HPSv2", "HPS_v2.1_compressed.pt")
        self.model = open_clip.create_model(arch, pretrained=None)
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        self.model.load_state_dict(state.get("state_dict", state))
        self.model = self.model.eval().requires_grad_(False).to(device)
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.size = self.model.visual.image_size[0] if isinstance(self.model.visual.image_size, tuple) else self.model.visual.image_size

    @torch.no_grad()
    def __call__(self, images, prompts):
        device = next(self.model.parameters()).device
        pixels = clip_preprocess(images.to(device), self.size, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
        image_embeds = F.normalize(self.model.encode_image(pixels), dim=-1)
        text_embeds = F.normalize(self.model.encode_text(self.tokenizer(prompts).to(device)), dim=-1)
        return (image_embeds * text_embeds).sum(-1).float().cpu()


REWARDS = {
    "colour": lambda device: colour_reward,
    "jpeg_compressibility": lambda device: jpeg_compressibility,
    "jpeg_incompressibility": lambda device: jpeg_incompressibility,
    "pickscore": PickScore,
    "hpsv2": HPSv2,
    "clipscore": CLIPScore,
}


def parse_reward_spec(spec):
    """'pickscore' or 'pickscore:1.0,jpeg_compressibility:0.1' -> [(name, weight), ...], checked."""
    terms = []
    for item in spec.split(","):
        name, _, weight = item.strip().partition(":")
        if name not in REWARDS:
            raise RunError(f"unknown reward '{name}'; choose from {', '.join(REWARDS)} (or a weighted sum 'a:1.0,b:0.5')")
        try:
            terms.append((name, float(weight or 1.0)))
        except ValueError:
            raise RunError(f"reward weight '{weight}' in '{item}' is not a number") from None
    return terms


def build_reward(spec, device):
    """One callable returning the weighted sum of the named rewards (models load here, once)."""
    terms = [(weight, REWARDS[name](device)) for name, weight in parse_reward_spec(spec)]

    def reward_fn(images, prompts):
        return sum(w * fn(images, prompts).float().cpu() for w, fn in terms)

    return reward_fn


# ----------------------------------------------------------------------------------------------------
# TRY NOT TO MODIFY: model setup
# ----------------------------------------------------------------------------------------------------

LORA_TARGETS = {  # attention projections: Flow-GRPO's for the SD3 transformer, diffusers' for the UNet
    "flow": ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"],
    "ddim": ["to_q", "to_k", "to_v", "to_out.0"],
}


def family(pipe):
    """'flow' for SD3-family pipelines (velocity, SDE sampler), 'ddim' for SD1.x (eps, DDIM sampler)."""
    return "flow" if hasattr(pipe, "transformer") else "ddim"


def denoiser(pipe):
    """The network being fine-tuned: the SD3 transformer or the SD1 UNet."""
    return pipe.transformer if family(pipe) == "flow" else pipe.unet


def _tiny_tokenizers():
    """CLIP (byte-level BPE with no merges) and T5 (unigram over letters) tokenizers built in memory."""
    from transformers import CLIPTokenizer, T5Tokenizer

    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars = [chr(b) for b in printable] + [chr(256 + n) for n in range(256 - len(printable))]  # GPT-2 byte map
    vocab = {tok: i for i, tok in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    clip = [CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77) for _ in range(2)]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in "\u2581abcdefghijklmnopqrstuvwxyz0123456789.,'"]
    return clip[0], clip[1], T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def _tiny_clip_config(tokenizer, **extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                          vocab_size=len(tokenizer), hidden_act="gelu", attention_dropout=0.0, dropout=0.0,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, **extra)


def _colour_vae():
    """A tiny AutoencoderKL whose decoder carries latent channels 0..2 through as RGB.

    A random VAE decodes every latent to nearly the same grey image, so a pixel reward could not tell
    trajectories apart. Here every residual block of the decoder is an identity (zeroed conv2 and
    attention output), its one upsampler copies pixels, and channels c, c + 3 carry +z_c, -z_c, so the
    final GroupNorm (one group) subtracts exactly 0 and divides by the rms of z: image_c = 0.6 z_c / rms(z).
    """
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
        layers_per_block=1, latent_channels=4, norm_num_groups=1, scaling_factor=1.0, shift_factor=0.0,
        use_quant_conv=False, use_post_quant_conv=False)  # one 2x upsampling: latents are half the image side
    with torch.no_grad():
        dec = vae.decoder
        for p in dec.parameters():
            p.zero_()
        for c in range(3):
            dec.conv_in.weight[c, c, 1, 1], dec.conv_in.weight[c + 3, c, 1, 1] = 1.0, -1.0
            dec.conv_out.weight[c, c, 1, 1], dec.conv_out.weight[c, c + 3, 1, 1] = 1.0, -1.0  # silu(a) - silu(-a) = a
        dec.up_blocks[0].upsamplers[0].conv.weight[:, :, 1, 1] = torch.eye(8)  # nearest-neighbour upsampling
        dec.conv_norm_out.weight.fill_(0.6)
    return vae


def build_tiny_pipeline(kind="flow", seed=0):
    """A random-weight pipeline of the real classes, small enough for a CPU, built offline.

    kind 'flow': StableDiffusion3Pipeline with SD3.5-M's layout (dual attention, RMS qk-norm, three text
    encoders); kind 'ddim': StableDiffusionPipeline (SD-v1.4's UNet layout, DDIM with its schedule).
    The denoiser and text encoders are random; the VAE carries colour through (see _colour_vae).
    """
    from diffusers import (DDIMScheduler, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline,
                           StableDiffusionPipeline, UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tok_l, tok_g, tok_t5 = _tiny_tokenizers()
    if kind == "ddim":
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64), norm_num_groups=16,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8)
        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                                  clip_sample=False, set_alpha_to_one=False)  # SD-v1.4's
        pipe = StableDiffusionPipeline(vae=_colour_vae(), text_encoder=CLIPTextModel(_tiny_clip_config(tok_l)), tokenizer=tok_l,
                                       unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    else:
        t5 = T5Config(d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, vocab_size=len(tok_t5), dropout_rate=0.0,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False)
        transformer = SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=32,
            num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=64, pooled_projection_dim=64,
            pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm")
        pipe = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_colour_vae(),
            text_encoder=CLIPTextModelWithProjection(_tiny_clip_config(tok_l, projection_dim=32)), tokenizer=tok_l,
            text_encoder_2=CLIPTextModelWithProjection(_tiny_clip_config(tok_g, projection_dim=32)), tokenizer_2=tok_g,
            text_encoder_3=T5EncoderModel(t5), tokenizer_3=tok_t5)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    return pipe


def load_pipeline(name_or_path, dtype):
    """'tiny' (SD3) or 'tiny-sd1', a local folder, or a hub id -> pipeline with frozen weights in `dtype`.

    The model family is read from the pipeline itself; SD1.x pipelines get a DDIM scheduler (DDPO).
    """
    from diffusers import DDIMScheduler, DiffusionPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline

    if name_or_path in ("tiny", "tiny-sd1"):
        pipe = build_tiny_pipeline("flow" if name_or_path == "tiny" else "ddim")
        if dtype != torch.float32:
            pipe.to(dtype=dtype)
    else:
        is_hub_id = name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~"))
        if not is_hub_id and not os.path.isdir(name_or_path):
            raise RunError(f"model folder '{name_or_path}' does not exist (give a folder, a hub id, 'tiny' or 'tiny-sd1')")
        try:
            pipe = DiffusionPipeline.from_pretrained(name_or_path, dtype=dtype, safety_checker=None)
        except (OSError, ValueError) as e:
            raise RunError(f"could not load '{name_or_path}': {str(e).splitlines()[0]} "
                           "(gated hub models need `hf auth login` and an accepted licence)") from None
        if not isinstance(pipe, (StableDiffusion3Pipeline, StableDiffusionPipeline)):
            raise RunError(f"'{name_or_path}' is a {type(pipe).__name__}; supported: StableDiffusion3Pipeline, StableDiffusionPipeline")
        if isinstance(pipe, StableDiffusionPipeline):
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
    return pipe


def trainable_parameters(pipe, args):
    """LoRA (peft) on the attention projections, or the whole denoiser with --full_finetune; fp32 either way.

    With LoRA the base weights stay frozen in their dtype and the reference policy for the KL is the same
    network with the adapter disabled.
    """
    from peft import LoraConfig

    model = denoiser(pipe)
    if args.full_finetune:  # DanceGRPO's choice for SD-v1.4: every UNet weight, fp32 master copy
        model.float().requires_grad_(True)
        return list(model.parameters())
    model.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.lora_alpha, init_lora_weights="gaussian",
                                 target_modules=LORA_TARGETS[family(pipe)]))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # fp32 weights for the optimiser, even with an fp16 base model
    return params


def save_weights(pipe, directory, full_finetune):
    """LoRA as pytorch_lora_weights.safetensors (diffusers format, `pipe.load_lora_weights(dir)` loads it),
    or the full denoiser as a diffusers model folder. Every file is written to a temporary name, then
    renamed, so a save killed half-way leaves the previous file intact."""
    from peft.utils import get_peft_model_state_dict

    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    model = denoiser(pipe)
    if full_finetune:
        model.save_pretrained(tmp / ("transformer" if family(pipe) == "flow" else "unet"))
    else:
        key = "transformer" if family(pipe) == "flow" else "unet"
        type(pipe).save_lora_weights(tmp, **{f"{key}_lora_layers": get_peft_model_state_dict(model),  # the weights,
                                             f"{key}_lora_adapter_metadata": model.peft_config["default"].to_dict()})  # alpha, targets
    for file in sorted(f for f in tmp.rglob("*") if f.is_file()):
        target = directory / file.relative_to(tmp)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(file, target)
    shutil.rmtree(tmp)


@torch.no_grad()
def encode_prompts(pipe, prompts, max_sequence_length):
    """Text embeddings for the prompts and for the empty negative prompt (CFG), computed once per epoch."""
    device = denoiser(pipe).device
    if family(pipe) == "ddim":
        embeds, neg_embeds = pipe.encode_prompt(prompts, device, 1, True, negative_prompt=[""] * len(prompts))
        return dict(embeds=embeds, neg_embeds=neg_embeds[:1])
    embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(  # SD3: CLIP-L + CLIP-G + T5, and pooled CLIP
        prompt=prompts, prompt_2=prompts, prompt_3=prompts, negative_prompt="", negative_prompt_2="",
        negative_prompt_3="", do_classifier_free_guidance=True, device=device, max_sequence_length=max_sequence_length)
    return dict(embeds=embeds, pooled=pooled, neg_embeds=neg_embeds[:1], neg_pooled=neg_pooled[:1])


@torch.no_grad()
def decode(pipe, x):
    """Latents -> images in [0, 1], (N, 3, H, W) fp32."""
    vae = pipe.vae
    latents = x / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
    images = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)


# ----------------------------------------------------------------------------------------------------
# ALGO LOGIC: rollout with expand and prune
# ----------------------------------------------------------------------------------------------------

def trajectory_seed(seed, epoch, prompt, member):
    """A seed that depends only on the trajectory's identity: not on batch size, ranks, or pruning."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{epoch}/{prompt}/{member}".encode()).digest()[:8], "little") >> 1


def sampler_schedule(pipe, num_steps, device):
    """The per-step schedule of the pipeline's sampler: (T,) tensors, see sampler_step.

    Flow: sigmas from diffusers' FlowMatchEulerDiscreteScheduler (1 -> 0; SD3.5: shift 3), model timestep
    1000 sigma. DDIM: diffusers' timesteps (981, 961, ..., 1 for T = 50) and alphas_cumprod at t and at
    prev_t = t - 1000 / T clamped at 0 (DDPO).
    """
    scheduler = pipe.scheduler
    scheduler.set_timesteps(num_steps, device=device)
    timesteps = scheduler.timesteps.to(device)
    if family(pipe) == "flow":
        sigmas = scheduler.sigmas.to(device, torch.float32)  # (T + 1,), ends at 0
        return dict(timesteps=timesteps, sigma=sigmas[:-1], sigma_next=sigmas[1:])
    prev = (timesteps - scheduler.config.num_train_timesteps // num_steps).clamp(min=0)
    alphas = scheduler.alphas_cumprod.to(device, torch.float32)
    return dict(timesteps=timesteps, alpha_prod_t=alphas[timesteps], alpha_prod_t_prev=alphas[prev])


def predict(model, x, t, text, prompt_idx, guidance_scale, batch_size):
    """Guided model output o = o_uncond + g (o_text - o_uncond) for every latent in x, in micro-batches.

    The velocity for SD3, the noise eps for SD1. x: (N, C, h, w) fp32; t: (N,) model timesteps;
    prompt_idx: (N,) rows of `text`. The same function serves sampling and the update, so both see the
    same CFG, dtype and conditioning: the first update step reproduces the sampling log-probs.
    """
    out = []
    for b_x, b_t, b_p in zip(x.split(batch_size), t.split(batch_size), prompt_idx.split(batch_size)):
        n = len(b_x)
        cond = dict(encoder_hidden_states=torch.cat([text["neg_embeds"].expand(n, -1, -1), text["embeds"][b_p]]))  # (2n, L, D)
        if "pooled" in text:  # SD3 also conditions on pooled CLIP embeddings
            cond["pooled_projections"] = torch.cat([text["neg_pooled"].expand(n, -1), text["pooled"][b_p]])  # (2n, P)
        dtype = model.dtype  # forward in the weight dtype; everything after it in fp32
        o = model(torch.cat([b_x, b_x]).to(dtype), timestep=torch.cat([b_t, b_t]), return_dict=False,
                  **{k: v.to(dtype) for k, v in cond.items()})[0]
        o_uncond, o_text = o.float().chunk(2)  # (n, C, h, w) each
        out.append(o_uncond + guidance_scale * (o_text - o_uncond))
    return torch.cat(out)


def score(pipe, x, prompts, reward_fn, args, stats):
    """Decode latents and score them, in micro-batches of their own sizes; a NaN or inf reward stops the run."""
    rewards = []
    for s in range(0, len(x), args.reward_batch_size):
        chunk = x[s:s + args.reward_batch_size]
        images = torch.cat([decode(pipe, b) for b in chunk.split(args.decode_batch_size)])  # (n, 3, H, W) in [0, 1]
        rewards.append(reward_fn(images, prompts[s:s + len(chunk)]).float())
    rewards = torch.cat(rewards)
    stats["decodes"] += len(x)
    stats["reward_calls"] += len(x)
    bad = (~torch.isfinite(rewards)).nonzero().flatten()
    if len(bad):
        raise RunError(f"reward is {rewards[bad[0]].item()} for prompt '{prompts[bad[0]]}'; stopping instead of training on it")
    return rewards


def ovf_rows(rewards, k):
    """(B, n) rewards, one row per prompt -> flat row indices of every prompt's OVF subset of size k."""
    n = rewards.shape[1]
    return torch.cat([p * n + ovf_select(r, k) for p, r in enumerate(rewards)])


def record_prune(audit, step, live, keep, scores, G):
    """Adds to every prompt's audit the members alive at `step`, their (B, n) scores, and the members kept."""
    B = len(audit)
    members, kept = (live.view(B, -1) % G).tolist(), (live[keep].view(B, -1) % G).tolist()
    for p, a in enumerate(audit):
        a["checkpoints"].append(dict(step=step, members=members[p], proxy=scores[p].tolist(), kept=kept[p]))


def group_std(rewards):
    """Mean over prompts of the within-group population std of (B, n) rewards."""
    return rewards.std(1, correction=0).mean().item()


@torch.no_grad()
def rollout(pipe, text, prompts, reward_fn, args, epoch, schedule, prompt_ids=None, progress=False):
    """Sample G_max trajectories for each of the B prompts, pruning at the schedule's checkpoints.

    prompt_ids: the prompts' positions in the epoch's whole batch (default 0..B-1); with the epoch they
    seed every trajectory's noise, so a rank sampling a share of the batch samples what one process would.

    Returns the survivors (all tensors row-aligned, sorted by trajectory id = prompt * G_max + member):
      latents (N, T + 1, C, h, w) fp32, log_probs (N, T), rewards (N,), prompt_idx (N,), member (N,),
    plus counters (NFE, decodes, reward calls) and the per-prompt prune audit.
    """
    model = denoiser(pipe)
    device = model.device
    B, G, T = len(prompts), args.group_size, args.num_steps
    sched = sampler_schedule(pipe, T, device)
    side = args.resolution // pipe.vae_scale_factor
    shape = (model.config.in_channels, side, side)
    prompt_ids = list(range(B)) if prompt_ids is None else prompt_ids
    live = torch.arange(B * G)  # ids of the live trajectories, increasing, so each prompt's rows stay contiguous
    generators = [torch.Generator(device).manual_seed(trajectory_seed(args.seed, epoch, prompt_ids[int(i) // G], int(i) % G))
                  for i in live]
    x = torch.stack([torch.randn(shape, generator=g, device=device) for g in generators])  # (B G, C, h, w), pure noise
    latents, log_probs = [x], []  # one (n_live, ...) entry per step; rows follow `live`
    keep_at, stats = dict(schedule), dict(nfe=0, decodes=0, reward_calls=0, audit_nfe=0, audit_decodes=0)
    audit = [dict(index=i, prompt=p, checkpoints=[]) for i, p in zip(prompt_ids, prompts)]
    detours = []  # (step, ids, x, out) of pruned trajectories kept aside to be finished for --audit_fraction
    for i in tqdm(range(T), desc=f"epoch {epoch} sampling", leave=False, disable=not progress):
        steps = torch.full((len(live),), i, device=device)  # (n_live,) the step index of every live trajectory
        out = predict(model, x, sched["timesteps"][steps], text, live // G, args.guidance_scale, args.sample_batch_size)
        stats["nfe"] += len(live)  # one trajectory-step per live trajectory: nothing else calls the model
        if i in keep_at:
            # Pro-GRPO: project to x0 with the output step i needs anyway, decode, score, keep OVF subsets
            proxy = score(pipe, project_x0(sched, steps, x, out), [prompts[p] for p in live // G], reward_fn,
                          args, stats).view(B, -1)  # (B, n_live / B)
            keep = ovf_rows(proxy, keep_at[i])
            record_prune(audit, i, live, keep, proxy, G)
            aside = [r for r in sorted(set(range(len(live))) - set(keep.tolist()))
                     if audit_draw(args.seed, epoch, prompt_ids[int(live[r]) // G], int(live[r]) % G) < args.audit_fraction]
            if aside:
                detours.append((i, live[aside], x[aside], out[aside]))
            # pruned trajectories stop here: drop their rows everywhere so their memory is released
            live, x, out, steps = live[keep], x[keep], out[keep], steps[keep]
            latents, log_probs = [l[keep] for l in latents], [lp[keep] for lp in log_probs]
        noise = torch.stack([torch.randn(shape, generator=generators[j], device=device) for j in live.tolist()])
        x, logp, _, _ = sampler_step(sched, steps, out, x, args.noise_level, noise=noise)
        latents.append(x)
        log_probs.append(logp)
    rewards = score(pipe, x, [prompts[p] for p in live // G], reward_fn, args, stats)
    if args.ovf_after_sampling:  # the paper's static OVF: prune once, on true final rewards (audited as step T)
        keep = ovf_rows(rewards.view(B, -1), args.ovf_after_sampling)
        record_prune(audit, T, live, keep, rewards.view(B, -1), G)
        live, rewards = live[keep], rewards[keep]
        latents, log_probs = [l[keep] for l in latents], [lp[keep] for lp in log_probs]
    for p in range(B):
        audit[p].update(survivors=(live.view(B, -1)[p] % G).tolist(), final=rewards.view(B, -1)[p].tolist(), audited={})
    if detours:
        ids, finals = finish_detours(pipe, text, prompts, reward_fn, args, sched, detours, generators, stats)
        for j, r in zip(ids.tolist(), finals.tolist()):
            audit[j // G]["audited"][j % G] = r
    samples = dict(latents=torch.stack(latents, 1), log_probs=torch.stack(log_probs, 1), rewards=rewards,
                   prompt_idx=live // G, member=live % G)
    return samples, stats, audit


def audit_draw(seed, epoch, prompt, member):
    """A uniform number in [0, 1) fixed by the trajectory's identity: which pruned trajectories get audited."""
    return trajectory_seed(seed, epoch, f"audit/{prompt}", member) / 2**63


@torch.no_grad()
def finish_detours(pipe, text, prompts, reward_fn, args, sched, detours, generators, stats):
    """Diagnostics only: run pruned trajectories to the end (never trained) and score them.

    Each continues with its own generator from where it was pruned, reusing the model output of that
    step, so its final reward is the one it would have had without pruning. Counted apart from the
    schedule's NFE (perf/audit_nfe, perf/audit_decodes). Returns (trajectory ids, final rewards).
    """
    model, G = denoiser(pipe), args.group_size
    ids, x = torch.zeros(0, dtype=torch.long), None
    audit_stats = dict(decodes=0, reward_calls=0)
    for i in range(detours[0][0], args.num_steps):
        out = None
        if len(ids):
            out = predict(model, x, sched["timesteps"][torch.full((len(ids),), i, device=x.device)], text, ids // G,
                          args.guidance_scale, args.sample_batch_size)
            stats["audit_nfe"] += len(ids)
        for step, j_ids, j_x, j_out in detours:
            if step == i:  # joiners already have this step's model output
                ids = torch.cat([ids, j_ids])
                x = j_x if x is None else torch.cat([x, j_x])
                out = j_out if out is None else torch.cat([out, j_out])
        noise = torch.stack([torch.randn(x.shape[1:], generator=generators[j], device=x.device) for j in ids.tolist()])
        x = sampler_step(sched, torch.full((len(ids),), i, device=x.device), out, x, args.noise_level, noise=noise)[0]
    finals = score(pipe, x, [prompts[j // G] for j in ids.tolist()], reward_fn, args, audit_stats)
    stats["audit_decodes"] += audit_stats["decodes"]
    return ids, finals


@torch.no_grad()
def sample_deterministic(pipe, text, args, num_steps, seed):
    """Evaluation images: the deterministic sampler (Euler ODE / DDIM eta = 0), one per prompt, fixed noise."""
    model = denoiser(pipe)
    device, n = model.device, len(text["embeds"])
    sched = sampler_schedule(pipe, num_steps, device)
    side = args.resolution // pipe.vae_scale_factor
    x = torch.stack([torch.randn((model.config.in_channels, side, side), device=device,
                                 generator=torch.Generator(device).manual_seed(trajectory_seed(seed, "eval", p, 0))) for p in range(n)])
    for i in range(num_steps):
        steps = torch.full((n,), i, device=device)
        out = predict(model, x, sched["timesteps"][steps], text, torch.arange(n), args.guidance_scale, args.sample_batch_size)
        x = sampler_step(sched, steps, out, x, 0.0)[0]
    return torch.cat([decode(pipe, b) for b in x.split(args.decode_batch_size)])


# ----------------------------------------------------------------------------------------------------
# ALGO LOGIC: the GRPO update on the survivors
# ----------------------------------------------------------------------------------------------------

def train_epoch(pipe, params, optimizer, samples, adv, text, args, epoch, ema=None, progress=False):
    """PPO-clip GRPO over the survivors' stored steps: recompute log-probs, clip, KL, AdamW.

    Each trajectory trains on its first int(T * timestep_fraction) steps: in order for flow models
    (Flow-GRPO), in a random order per trajectory for diffusion models (DanceGRPO). Micro-batches of
    trajectories; the epoch's micro-batches are split into `updates_per_epoch` optimiser steps. Under
    torchrun the gradients are averaged over ranks before clipping (DDP over the trainable weights).
    `ema` (a list of tensors, or None) follows the weights after every optimiser step.
    Returns per-(micro-batch, step) statistics.
    """
    model = denoiser(pipe)
    device = model.device
    sched = sampler_schedule(pipe, args.num_steps, device)
    n_train = int(args.num_steps * args.timestep_fraction)
    g = torch.Generator().manual_seed(trajectory_seed(args.seed, epoch, "train", 0))
    order = torch.randperm(len(adv), generator=g)
    if family(pipe) == "flow":
        step_order = torch.arange(n_train).repeat(len(adv), 1)  # (N, n_train)
    else:
        step_order = torch.stack([torch.randperm(n_train, generator=g) for _ in range(len(adv))])
    minibatches = order.split(args.train_batch_size)
    info = {k: [] for k in ("loss", "ratio", "approx_kl", "clipfrac", "kl", "grad_norm")}
    bar = tqdm(total=len(minibatches) * n_train, desc=f"epoch {epoch} update", leave=False, disable=not progress)
    n_updates = min(args.updates_per_epoch, len(minibatches))
    for u, update in enumerate(torch.arange(len(minibatches)).tensor_split(n_updates)):
        for mb in update.tolist():
            b_idx = minibatches[mb]
            b_x, b_logp_old, b_adv = samples["latents"][b_idx], samples["log_probs"][b_idx], adv[b_idx]  # (b, T+1, C, h, w), (b, T), (b,)
            b_prompt, rows = samples["prompt_idx"][b_idx], torch.arange(len(b_idx))
            for j in range(n_train):
                steps = step_order[b_idx, j]  # (b,) which step each trajectory trains now
                x, x_next, t = b_x[rows, steps], b_x[rows, steps + 1], sched["timesteps"][steps.to(device)]
                out = predict(model, x, t, text, b_prompt, args.guidance_scale, len(b_idx))
                out_ref = None
                if args.beta > 0:  # the reference policy is the base model: the same network, adapter off
                    model.disable_adapters()
                    with torch.no_grad():
                        out_ref = predict(model, x, t, text, b_prompt, args.guidance_scale, len(b_idx))
                    model.enable_adapters()
                logp_new, kl = step_logprob(sched, steps.to(device), out, x, x_next, args.noise_level, out_ref)
                logp_old = b_logp_old[rows, steps]
                loss, ratio = ppo_clip_loss(logp_new, logp_old, b_adv, args.clip_range)
                if kl is not None:
                    loss = loss + args.beta * kl.mean()
                (loss / (len(update) * n_train)).backward()  # average over the micro-batches and steps of one update
                # statistics stay on the device: a .item() here would be a CPU-GPU sync point every step
                info["loss"].append(loss.detach())
                info["ratio"].append(ratio.detach().mean())
                info["approx_kl"].append(0.5 * ((logp_new.detach() - logp_old) ** 2).mean())
                info["clipfrac"].append(((ratio.detach() - 1).abs() > args.clip_range).float().mean())
                info["kl"].append(kl.detach().mean() if kl is not None else torch.zeros((), device=device))
                bar.update()
        average_gradients(params)
        info["grad_norm"].append(torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema_update(ema, params, step=epoch * n_updates + u)
    bar.close()
    return {k: torch.stack(v).float().cpu() for k, v in info.items()}


# ----------------------------------------------------------------------------------------------------
# TRY NOT TO MODIFY: ranks, EMA, checkpoints
# ----------------------------------------------------------------------------------------------------

def setup_distributed():
    """(rank, world size, device). Under torchrun: one process per GPU (NCCL), or per CPU process (gloo)."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device


def log0(rank, message):
    if rank == 0:
        print(message)


def gather(obj):
    """Every rank's `obj`, in rank order (a list of one without torchrun)."""
    if not torch.distributed.is_initialized():
        return [obj]
    parts = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, obj)
    return parts


def average_gradients(params):
    """DDP's job, spelled out: one all-reduce of all gradients, flattened, then divided by the world size."""
    if not torch.distributed.is_initialized():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= torch.distributed.get_world_size()
    for p, g in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p)


def ema_update(ema, params, step, decay=0.9, every=8):
    """Flow-GRPO's EMA: every 8 optimiser steps, ema += (1 - d) (p - ema), d = min(0.9, (1 + n) / (10 + n))."""
    if (step + 1) % every == 0:
        d = min(decay, (1 + step) / (10 + step))
        for e, p in zip(ema, params):
            e.lerp_(p.detach(), 1 - d)


@contextmanager
def ema_weights(params, ema):
    """Temporarily load the EMA weights (for evaluation and saving); a no-op without --ema."""
    if ema is None:
        yield
        return
    current = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, c in zip(params, current):
                p.copy_(c)


def save_checkpoint(directory, epoch, history, pipe, params, optimizer, ema, args):
    """A resumable checkpoint: the weights users load (EMA if on) and training_state.pt with everything else.

    training_state.pt is written to a temporary file and renamed, so it exists only when complete: a run
    killed while writing it resumes from the previous checkpoint.
    """
    directory = Path(directory)
    with ema_weights(params, ema):
        save_weights(pipe, directory, args.full_finetune)
    names = [n for n, p in denoiser(pipe).named_parameters() if p.requires_grad]
    state = dict(epoch=epoch, history=history, names=names, shapes=[tuple(p.shape) for p in params],
                 params=[p.detach().cpu() for p in params], optimizer=optimizer.state_dict(),
                 ema=None if ema is None else [e.cpu() for e in ema], torch_rng=torch.get_rng_state(),
                 cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    tmp = directory / "training_state.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, directory / "training_state.pt")


def find_checkpoint(output_dir, spec):
    """'latest' -> the newest checkpoint-N in output_dir whose training_state.pt is complete; else a folder."""
    if spec != "latest":
        if not (Path(spec) / "training_state.pt").is_file():
            raise RunError(f"no training_state.pt in checkpoint folder '{spec}'")
        return Path(spec)
    done = [d for d in Path(output_dir).glob("checkpoint-*") if (d / "training_state.pt").is_file()]
    if not done:
        raise RunError(f"--resume_from_checkpoint latest: no complete checkpoint in '{output_dir}'")
    return max(done, key=lambda d: int(d.name.split("-")[1]))


def load_checkpoint(directory, pipe, params, optimizer, ema):
    """Restores weights, optimiser, EMA and RNG in place; returns (first epoch to run, metrics history)."""
    path = Path(directory) / "training_state.pt"
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file: refuse it, naming it
        raise RunError(f"checkpoint '{path}' is unreadable ({type(e).__name__}); delete it to resume from an earlier one") from None
    names = [n for n, p in denoiser(pipe).named_parameters() if p.requires_grad]
    if state["names"] != names or state["shapes"] != [tuple(p.shape) for p in params] or (state["ema"] is None) != (ema is None):
        raise RunError(f"checkpoint '{path}' does not match this run's trainable weights (model, --rank, --full_finetune, --ema)")
    with torch.no_grad():
        for p, saved in zip(params, state["params"]):
            p.copy_(saved)
        for e, saved in zip(ema or [], state["ema"] or []):
            e.copy_(saved)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["epoch"], state["history"]


# ----------------------------------------------------------------------------------------------------
# TRY NOT TO MODIFY: the training loop
# ----------------------------------------------------------------------------------------------------

DEMO_OBJECTS, DEMO_EVAL_OBJECTS = ["apple", "car", "bird", "house", "flower", "boat", "cup", "kite"], ["chair", "dog", "lamp", "tree"]


def read_prompts(path, held_out=False):
    """One prompt per line; 'demo' gives the built-in colour prompts (held-out objects for evaluation)."""
    if path == "demo":
        return [f"a {c} {o}" for o in (DEMO_EVAL_OBJECTS if held_out else DEMO_OBJECTS) for c in COLOURS]
    if not os.path.isfile(path):
        raise RunError(f"prompts file '{path}' not found (one prompt per line; `bash run.sh sd35` fetches Pick-a-Pic's)")
    prompts = [line.strip() for line in open(path, encoding="utf-8") if line.strip()]
    if not prompts:
        raise RunError(f"prompts file '{path}' has no prompts")
    return prompts


def validate(args):
    """Checks that need no model; returns the prune schedule."""
    parse_reward_spec(args.reward)
    try:
        schedule = parse_prune_schedule(args.prune, args.num_steps, args.group_size)
    except ValueError as e:
        raise RunError(str(e)) from None
    final = schedule[-1][1] if schedule else args.group_size
    if args.ovf_after_sampling and not 2 <= args.ovf_after_sampling < final:
        raise RunError(f"--ovf_after_sampling {args.ovf_after_sampling} must be in [2, {final}) (the group reaching the end)")
    if args.mixed_precision not in ("no", "fp16", "bf16"):
        raise RunError(f"--mixed_precision must be no, fp16 or bf16 (got '{args.mixed_precision}')")
    if args.full_finetune and args.beta > 0:
        raise RunError("--full_finetune has no frozen reference for the KL term; use --beta 0 (as DanceGRPO) or LoRA")
    if not 0 <= args.audit_fraction <= 1:
        raise RunError(f"--audit_fraction is a share of the pruned trajectories, in [0, 1] (got {args.audit_fraction})")
    if args.noise_level <= 0:
        raise RunError(f"--noise_level must be positive: training needs a stochastic sampler (got {args.noise_level})")
    if args.resolution % 16:
        raise RunError(f"--resolution must be a multiple of 16 (got {args.resolution})")
    if min(args.prompts_per_epoch, args.sample_batch_size, args.decode_batch_size, args.reward_batch_size,
           args.train_batch_size, args.updates_per_epoch) < 1:
        raise RunError("batch sizes, --prompts_per_epoch and --updates_per_epoch must be at least 1")
    if not 0 < args.timestep_fraction <= 1 or int(args.num_steps * args.timestep_fraction) < 1:
        raise RunError(f"--timestep_fraction must leave at least one trained step (got {args.timestep_fraction})")
    return schedule


def epoch_metrics(epoch, rewards, stats, audit, info, args, schedule):
    """One metrics.jsonl line from the survivors' rewards (B, K), the counters, the audit and the update."""
    B = rewards.shape[0]
    before, after = [], []  # mean within-prompt std of the proxy rewards at each checkpoint, all live / kept
    for k in range(len(schedule)):
        checkpoints = [a["checkpoints"][k] for a in audit]
        before.append(group_std(torch.tensor([c["proxy"] for c in checkpoints])))
        after.append(group_std(torch.tensor([[c["proxy"][c["members"].index(m)] for m in c["kept"]] for c in checkpoints])))
    fidelity = [proxy_fidelity(audit, k) for k in range(len(schedule))] if args.audit_fraction else []
    expanded = torch.tensor([a["checkpoints"][0]["proxy"] if a["checkpoints"] else a["final"] for a in audit])  # (B, G_max)
    return {
        "epoch": epoch,
        "reward/mean": rewards.mean().item(),
        "reward/std": rewards.std(correction=0).item(),
        "reward/group_std": group_std(rewards),
        "reward/zero_std_groups": int((rewards.max(1).values == rewards.min(1).values).sum()),
        "prune/started": args.group_size,
        "prune/kept": rewards.shape[1],
        "prune/nfe_saved": 1 - stats["nfe"] / (B * args.group_size * args.num_steps),
        **{f"prune/group_std_before_{s}": b for (s, _), b in zip(schedule, before)},
        **{f"prune/group_std_after_{s}": a for (s, _), a in zip(schedule, after)},
        **{f"cluster/{name}_abs_adv_lt_{delta}": small_advantage_fraction(r, delta)
           for name, r in (("expanded", expanded), ("survivors", rewards)) for delta in (0.5, 0.1)},
        **{f"audit/{name}_{s}": f[name] for (s, _), f in zip(schedule, fidelity) for name in ("spearman", "kendall", "overlap")},
        "perf/nfe_sample": stats["nfe"],
        "perf/audit_nfe": stats["audit_nfe"],
        "perf/audit_decodes": stats["audit_decodes"],
        "perf/decodes": stats["decodes"],
        "perf/reward_calls": stats["reward_calls"],
        "policy/loss": info["loss"].mean().item(),
        "policy/approx_kl": info["approx_kl"].mean().item(),
        "policy/clipfrac": info["clipfrac"].mean().item(),
        "policy/ratio_mean": info["ratio"].mean().item(),
        "policy/kl": info["kl"].mean().item(),
        "policy/grad_norm": info["grad_norm"].mean().item(),
    }


def main(args):
    if args.flops_only:  # accounting only: meta-device models from their configs, no weights, no GPU
        print(flops_table(preset_flops(args.flops_configs)))
        return []
    if args.compare:
        return compare(args)
    schedule = validate(args)
    rank, world, device = setup_distributed()
    if args.prompts_per_epoch % world:
        raise RunError(f"--prompts_per_epoch {args.prompts_per_epoch} must be a multiple of the {world} ranks (whole groups per rank)")
    train_prompts, eval_prompts = read_prompts(args.prompts), read_prompts(args.eval_prompts, held_out=True)[:args.num_eval_prompts]
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision] if device.type == "cuda" else torch.float32
    reward_fn = build_reward(args.reward, device)
    pipe = load_pipeline(args.pretrained_model_name_or_path, dtype).to(device)
    if pipe.vae.dtype != torch.float32:
        pipe.vae.to(torch.float32)  # decode in fp32 (Flow-GRPO): an fp16 SD3 VAE overflows
    torch.manual_seed(args.seed)  # the same LoRA initialisation on every rank
    params = trainable_parameters(pipe, args)
    if args.gradient_checkpointing:
        denoiser(pipe).enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay)
    ema = [p.detach().clone() for p in params] if args.ema else None
    # FLOPs of one call of each kind, counted once on the real models; each epoch multiplies them by its counts
    per_call = call_flops(pipe, reward_fn, encode_prompts(pipe, train_prompts[:1], args.max_sequence_length), train_prompts[0], args)
    out = Path(args.output_dir)
    start_epoch, history = 0, []
    if args.resume_from_checkpoint:
        start_epoch, history = load_checkpoint(find_checkpoint(out, args.resume_from_checkpoint), pipe, params, optimizer, ema)
    if rank == 0:  # only rank 0 writes files; a resumed run keeps the lines of the epochs it keeps
        (out / "samples").mkdir(parents=True, exist_ok=True)
        for name in ("metrics.jsonl", "prune_audit.jsonl"):
            kept = [line for line in (out / name).read_text().splitlines() if json.loads(line)["epoch"] < start_epoch] \
                if (out / name).exists() else []
            (out / name).write_text("".join(line + "\n" for line in kept))
    alive = live_counts(args.num_steps, args.group_size, schedule)
    survivors = args.ovf_after_sampling or alive[-1]
    log0(rank, f"device {device} ({dtype}) x {world} ranks, {sum(p.numel() for p in params):,} trainable parameters, {len(train_prompts)} prompts")
    log0(rank, f"per prompt: {args.group_size} started -> {survivors} trained; live per step {alive}; "
               f"NFE {sum(alive)} per group vs {args.group_size * args.num_steps} unpruned ({1 - sum(alive) / (args.group_size * args.num_steps):.0%} saved)")
    for epoch in range(start_epoch, args.num_epochs):
        # ALGO LOGIC: 1-5 sample, prune, score. Each rank owns whole prompt groups: prompts rank, rank + world, ...
        pick = torch.randperm(len(train_prompts), generator=torch.Generator().manual_seed(trajectory_seed(args.seed, epoch, "prompts", 0)))
        prompt_ids = list(range(rank, args.prompts_per_epoch, world))  # positions in the epoch's batch: they seed the noise
        prompts = [train_prompts[pick[i % len(pick)]] for i in prompt_ids]  # a short prompt file repeats
        text = encode_prompts(pipe, prompts, args.max_sequence_length)
        t0 = time.time()
        samples, stats, audit = rollout(pipe, text, prompts, reward_fn, args, epoch, schedule, prompt_ids, progress=rank == 0)
        t1 = time.time()
        # ALGO LOGIC: 6-7 advantages over the survivors, then the clipped policy update
        advantages_fn = kernels.group_advantages if kernels is not None else group_advantages  # same numbers
        adv = advantages_fn(samples["rewards"], samples["prompt_idx"], clip=args.adv_clip_max, global_std=args.global_std).to(device)
        info = train_epoch(pipe, params, optimizer, samples, adv, text, args, epoch, ema, progress=rank == 0)
        t2 = time.time()
        # the epoch's FLOPs: the schedule's counts x the per-call FLOPs (the same on every rank and every epoch)
        flops = epoch_flops(per_call, args, schedule)
        last = epoch == args.num_epochs - 1 or 0 < args.max_flops <= (epoch + 1) * flops["total"]
        # TRY NOT TO MODIFY: gather every rank's groups, log, evaluate and save on rank 0
        # per-tensor weight sums, equal on every rank when in sync (only under torchrun: .cpu() syncs the GPU)
        checksum = torch.stack([p.detach().double().sum() for p in params]).cpu() if world > 1 else None
        parts = gather((samples["rewards"].view(len(prompts), -1), stats, audit, info, checksum))
        rewards = torch.cat([p[0] for p in parts])  # (B, K), rank-major order
        stats = {k: sum(p[1][k] for p in parts) for k in stats}  # NFE, decodes, reward calls
        audit = sorted((a for p in parts for a in p[2]), key=lambda a: a["index"])
        info = {k: torch.cat([p[3][k] for p in parts]) for k in info}
        if rank == 0:
            metrics = {**epoch_metrics(epoch, rewards, stats, audit, info, args, schedule),
                       **{f"perf/flops_{k}": flops[k] for k in ("sampling", "checkpoints", "final", "update")},
                       "perf/flops": flops["total"], "perf/flops_cumulative": (epoch + 1) * flops["total"],
                       "time/sample_s": t1 - t0, "time/train_s": t2 - t1,
                       "time/cumulative_s": (history[-1]["time/cumulative_s"] if history else 0.0) + t2 - t0}
            if world > 1:  # 0 when every rank holds the same weights after the epoch's optimiser steps
                metrics["dist/weight_spread"] = max((p[4] - parts[0][4]).abs().max().item() for p in parts)
            if args.eval_every and (epoch % args.eval_every == 0 or last):
                with ema_weights(params, ema):
                    metrics["eval/reward_mean"] = evaluate(pipe, reward_fn, eval_prompts, args, out / "samples" / f"epoch_{epoch:04d}.png")
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
            with open(out / "prune_audit.jsonl", "a") as f:
                f.writelines(json.dumps(dict(epoch=epoch, **a)) + "\n" for a in audit)
            history.append(metrics)
            print(f"epoch {epoch:4d} | reward {metrics['reward/mean']:.4f} (group std {metrics['reward/group_std']:.4f}) | "
                  f"kept {metrics['prune/kept']}/{args.group_size} | nfe {stats['nfe']} | loss {metrics['policy/loss']:+.4f} "
                  f"ratio {metrics['policy/ratio_mean']:.5f} clipfrac {metrics['policy/clipfrac']:.2f} kl {metrics['policy/kl']:.2e}"
                  + (f" | eval {metrics['eval/reward_mean']:.4f}" if "eval/reward_mean" in metrics else "")
                  + f" | {t1 - t0:.1f}s + {t2 - t1:.1f}s")
            if (epoch + 1) % args.checkpointing_steps == 0:
                save_checkpoint(out / f"checkpoint-{epoch + 1}", epoch + 1, history, pipe, params, optimizer, ema, args)
        if last:
            break
    if rank == 0:
        with ema_weights(params, ema):
            save_weights(pipe, out, args.full_finetune)
        plot_rewards(history, out / "reward_curve.png")
        plot_advantage_histogram(out / "prune_audit.jsonl", out / "advantage_histogram.png")
        print(f"done: metrics {out / 'metrics.jsonl'}, audit {out / 'prune_audit.jsonl'}, grids {out / 'samples'}, "
              f"curve {out / 'reward_curve.png'}, weights in {out}")
    if world > 1:
        torch.distributed.destroy_process_group()
    return history


# ----------------------------------------------------------------------------------------------------
# Diagnostics and pictures
# ----------------------------------------------------------------------------------------------------

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

    Uses the members whose final reward is known (survivors, plus pruned ones finished by
    --audit_fraction; all of them at 1): rank correlations of proxy vs final, and the share of the kept
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
    mean = lambda v: sum(v) / len(v) if v else None  # noqa: E731  (None: nothing to measure this epoch)
    return dict(spearman=mean(rho), kendall=mean(tau), overlap=mean(overlap))


def evaluate(pipe, reward_fn, prompts, args, grid_path):
    """ODE samples on held-out prompts: mean reward, and a grid PNG (one image per prompt)."""
    text = encode_prompts(pipe, prompts, args.max_sequence_length)
    images = sample_deterministic(pipe, text, args, args.eval_steps, args.seed)
    save_grid(images, grid_path, ncol=len(COLOURS) if args.eval_prompts == "demo" else 4)
    return reward_fn(images, prompts).mean().item()


def save_grid(images, path, ncol):
    """(N, 3, H, W) in [0, 1] -> one PNG; small images are enlarged (nearest) to be visible."""
    n, _, h, w = images.shape
    nrow = math.ceil(n / ncol)
    grid = torch.ones(3, nrow * (h + 2), ncol * (w + 2))
    for k, img in enumerate(images.float().cpu()):
        r, c = divmod(k, ncol)
        grid[:, r * (h + 2) + 1:r * (h + 2) + 1 + h, c * (w + 2) + 1:c * (w + 2) + 1 + w] = img
    picture = Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    scale = max(1, 128 // h)
    picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST).save(path)


def plot_rewards(history, path):
    """Training reward (survivors) and evaluation reward against epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([m["epoch"] for m in history], [m["reward/mean"] for m in history], label="train (survivors)")
    evals = [m for m in history if "eval/reward_mean" in m]
    ax.plot([m["epoch"] for m in evals], [m["eval/reward_mean"] for m in evals], "o-", label="eval (ODE, held-out prompts)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("reward")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    ax.hist(adv_kept.tolist(), bins=bins, density=True, alpha=0.5, label=f"trained survivors (K = {len(audit[0]['final'])})")
    ax.set_xlabel("normalised reward (advantage) within the group")
    ax.set_ylabel("density")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------
# Diagnostics: compute accounting (the paper's Table 4). torch counts the FLOPs of ONE real call of each
# kind (one trajectory or one image); the epoch's counts multiply them. A batch's FLOPs are linear in its
# size, so counts x per-call is exact. A multiply-add is 2 FLOPs (torch's convention).
# ----------------------------------------------------------------------------------------------------

FLOPS_PRESETS = {  # run.sh's presets: model family and the flags that change the counts (sd14: B = 4, one GPU)
    "sd35": ("flow", dict(group_size=48, prune="5:24,7:12")),
    "sd35-flash": ("flow", dict(group_size=24, prune="5:16,7:12")),
    "sd35-baseline": ("flow", dict(group_size=24, prune="none")),
    "sd14": ("ddim", dict(group_size=48, prune="30:32,40:8", num_steps=50, prompts_per_epoch=4, beta=0.0,
                          full_finetune=True)),
    "sd14-baseline": ("ddim", dict(group_size=16, prune="none", num_steps=50, prompts_per_epoch=4, beta=0.0,
                                   full_finetune=True)),
}
PAPER_TFLOPS = {"sd35-baseline": 453_474, "sd35": 335_627, "sd35-flash": 267_366}  # Table 4, per epoch: sampling + update
PAPER_DECODE_TFLOPS, PAPER_REWARD_TFLOPS = 2.49, 0.34  # Table 4, per image


def count_flops(fn, *args, **kwargs):
    """(fn(*args, **kwargs), the FLOPs it ran): matmuls, convolutions and attention, forward and backward."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    # torch's counter has formulas for the GPU attention kernels but not the CPU one, which would count 0
    aten = torch.ops.aten
    cpu_attention = {aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *_, **__: sdpa_flop_count(q, k, v),
                     aten._scaled_dot_product_flash_attention_for_cpu_backward:
                         lambda grad, q, k, v, *_, **__: sdpa_backward_flop_count(grad, q, k, v)}
    with FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter:
        result = fn(*args, **kwargs)
    return result, counter.get_total_flops()


def call_flops(pipe, reward_fn, text, prompt, args):
    """FLOPs of one call of each kind for ONE trajectory or image, through this file's own functions.

    model: a guided evaluation (predict: the CFG pair, batch 2); train: the same with grad, and its backward
    into the trainable weights (the update, per trajectory-step); reference: the guided forward with the
    LoRA adapter off (the KL's base model); decode: one latent; reward: one image. `text` holds `prompt`
    in row 0. Real or meta-device models (meta_pipeline): only shapes matter, so any timestep will do.
    """
    model = denoiser(pipe)
    device, side = model.device, args.resolution // pipe.vae_scale_factor
    x = torch.randn(1, model.config.in_channels, side, side, device=device)
    t, row = torch.full((1,), 500.0, device=device), torch.zeros(1, dtype=torch.long, device=device)

    def guided():
        return predict(model, x, t, text, row, args.guidance_scale, 1)

    flops = {}
    with torch.no_grad():
        flops["model"] = flops["reference"] = count_flops(guided)[1]
        if getattr(model, "_hf_peft_config_loaded", False):  # LoRA: the reference skips the adapter's matmuls
            model.disable_adapters()
            flops["reference"] = count_flops(guided)[1]
            model.enable_adapters()
        images, flops["decode"] = count_flops(decode, pipe, x)
        flops["reward"] = count_flops(reward_fn, images, [prompt])[1]
    # autograd.grad, not backward(): the same graph and FLOPs, but no .grad left on the weights. Frozen
    # weights need no weight gradient, so with LoRA the backward costs ~1 forward instead of 2
    params = [p for p in model.parameters() if p.requires_grad]
    flops["train"] = count_flops(lambda: torch.autograd.grad(guided().square().mean(), params))[1]
    return flops


def epoch_flops(per_call, args, schedule):
    """FLOPs of one epoch (B = args.prompts_per_epoch groups): the schedule's counts x call_flops' per-call FLOPs.

    sampling: NFE model calls per group; checkpoints: a decode and a reward call per live trajectory at each
    checkpoint (the projection reuses the model output); final: the same for every trajectory reaching the
    end; update: K trajectories x int(T * timestep_fraction) steps x (train + reference when beta > 0).
    """
    alive = live_counts(args.num_steps, args.group_size, schedule)
    final = schedule[-1][1] if schedule else args.group_size  # trajectories that reach the end
    trained = args.ovf_after_sampling or final  # static OVF scores the whole group but trains only K'
    image = per_call["decode"] + per_call["reward"]
    step = per_call["train"] + (per_call["reference"] if args.beta > 0 else 0)
    B = args.prompts_per_epoch
    out = dict(nfe=sum(alive), sampling=B * sum(alive) * per_call["model"],
               checkpoints=B * sum(alive[s] for s, _ in schedule) * image, final=B * final * image,
               update=B * trained * int(args.num_steps * args.timestep_fraction) * step)
    out["total"] = out["sampling"] + out["checkpoints"] + out["final"] + out["update"]
    return out


def clip_reward(clip):
    """ClipScore's computation (PickScore) on a CLIP model, with token ids in place of a tokenizer: the reward
    of the meta-device models. HPSv2.1 is open_clip's ViT-H-14, the same architecture."""
    def reward_fn(images, prompts):
        size = clip.config.vision_config.image_size  # any mean and std cost the same
        pixels = clip_preprocess(images, size, (0.5,) * 3, (0.5,) * 3)  # (N, 3, 224, 224)
        ids = torch.zeros(len(prompts), clip.config.text_config.max_position_embeddings, dtype=torch.long, device=images.device)
        return clip.logit_scale.exp() * clip_cosine(clip, pixels, dict(input_ids=ids))
    return reward_fn


def meta_pipeline(config_dir, kind, args):
    """The paper's models on the meta device, from their published configs: real shapes, no weights, no download.

    kind 'flow': SD3.5-Medium (transformer, VAE, CLIP-L + CLIP-G + T5-XXL); 'ddim': SD-v1.4 (UNet, VAE, CLIP-L).
    Returns (pipe, clip, text, text_flops): the reward's CLIP-H, zero text embeddings of the shapes the
    encoders give, and the FLOPs of one prompt through the text encoders.
    """
    from diffusers import (AutoencoderKL, DDIMScheduler, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline, StableDiffusionPipeline, UNet2DConditionModel)
    from transformers import (CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config,
                              T5EncoderModel)

    def read(name):
        path = Path(config_dir) / name
        if not path.is_file():
            raise RunError(f"architecture config '{path}' not found; give the folder of the published model configs")
        return json.loads(path.read_text())

    with torch.device("meta"):  # weights get shapes but no memory, and every op computes only shapes
        clip = CLIPModel(CLIPConfig(**read("pickscore_clip.json")))
        if kind == "flow":
            enc = read("sd35m_text_encoders.json")
            pipe = StableDiffusion3Pipeline(
                transformer=SD3Transformer2DModel.from_config(read("sd35m_transformer.json")),
                vae=AutoencoderKL.from_config(read("sd35m_vae.json")),
                scheduler=FlowMatchEulerDiscreteScheduler.from_config(read("sd35m_scheduler.json")),
                text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**enc["clip_l"])), tokenizer=None,
                text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**enc["clip_g"])), tokenizer_2=None,
                text_encoder_3=T5EncoderModel(T5Config(**enc["t5"])), tokenizer_3=None)
            encoders = [(pipe.text_encoder, 77), (pipe.text_encoder_2, 77), (pipe.text_encoder_3, args.max_sequence_length)]
            # SD3 joins 77 CLIP tokens (L and G side by side, zero-padded to 4096) with the T5 tokens
            embeds = torch.zeros(1, 77 + args.max_sequence_length, pipe.transformer.config.joint_attention_dim)
            pooled = torch.zeros(1, pipe.transformer.config.pooled_projection_dim)  # CLIP-L + CLIP-G pooled
            text = dict(embeds=embeds, pooled=pooled, neg_embeds=embeds, neg_pooled=pooled)
        else:
            pipe = StableDiffusionPipeline(
                unet=UNet2DConditionModel.from_config(read("sd14_unet.json")),
                vae=AutoencoderKL.from_config(read("sd14_vae.json")),
                scheduler=DDIMScheduler.from_config(read("sd14_scheduler.json")), tokenizer=None,
                text_encoder=CLIPTextModel(CLIPTextConfig(**read("sd14_text_encoder.json"))),
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)
            encoders = [(pipe.text_encoder, 77)]
            embeds = torch.zeros(1, 77, pipe.unet.config.cross_attention_dim)
            text = dict(embeds=embeds, neg_embeds=embeds)
        text_flops = sum(count_flops(encoder, torch.zeros(1, n, dtype=torch.long))[1] for encoder, n in encoders)
    return pipe, clip, text, text_flops


def preset_flops(config_dir):
    """{preset: epoch_flops(...) plus per_call, args, schedule, params (the frozen denoiser's), image_tokens,
    text_flops (one prompt through the text encoders), text (their FLOPs per epoch, not in the totals)}."""
    families, results = {}, {}
    for name, (kind, flags) in FLOPS_PRESETS.items():
        args = Args(**flags)
        if kind not in families:  # a family's presets share every shape: one set of calls serves them all
            pipe, clip, text, text_flops = meta_pipeline(config_dir, kind, args)
            model = denoiser(pipe)
            params = sum(p.numel() for p in model.parameters())  # before LoRA joins them
            with torch.device("meta"):
                trainable_parameters(pipe, args)  # LoRA (its matmuls count) or the whole UNet (--full_finetune)
            per_call = call_flops(pipe, clip_reward(clip), text, "", args)
            # the reward's image tower alone, as the paper's per-image figure seems to count it
            side = clip.config.vision_config.image_size
            pixels = torch.zeros(1, 3, side, side, device="meta")
            per_call["reward_image"] = count_flops(clip.get_image_features, pixel_values=pixels)[1]
            tokens = (args.resolution // pipe.vae_scale_factor // getattr(model.config, "patch_size", 1)) ** 2
            families[kind] = dict(per_call=per_call, params=params, image_tokens=tokens, text_flops=text_flops)
        shared = families[kind]
        schedule = parse_prune_schedule(args.prune, args.num_steps, args.group_size)
        # every epoch encodes its B prompts and B empty negatives (diffusers encodes one per prompt)
        results[name] = dict(epoch_flops(shared["per_call"], args, schedule), args=args, schedule=schedule,
                             text=2 * args.prompts_per_epoch * shared["text_flops"], **shared)
    return results


def accounting_variants(results):
    """{label: {sd35 preset: total FLOPs per epoch}} under other accounting choices, each a change of per-call
    FLOPs or of flags put through the same epoch_flops. The paper's Table 4 says which it made for none of them."""
    pc, r35 = results["sd35"]["per_call"], results["sd35"]
    full = {**pc, "train": 3 * pc["model"]}  # backward = 2 forwards: a weight gradient for every weight
    rule = 2 * 2 * r35["params"] * r35["image_tokens"]  # CFG pair x 2 FLOPs x N parameters x image tokens
    variants = [  # (label, per-call FLOPs, flags changed)
        ("ours, measured: CFG pair and reference forward in the update, LoRA backward", pc, {}),
        ("without CFG in the update", {**pc, "train": pc["train"] / 2, "reference": pc["reference"] / 2}, {}),
        ("without the reference forward", pc, dict(beta=0.0)),
        ("update = 3 forwards (full backward, the 6N rule) + reference", full, {}),
        (f"3 forwards + reference, all {r35['args'].num_steps} steps trained", full, dict(timestep_fraction=1.0)),
        ("3 forwards + reference, decode and reward left out", {**full, "decode": 0, "reward": 0}, {}),
        (f"3 forwards + reference, a forward by the 2N rule: 2 FLOPs x N = {r35['params'] / 1e9:.2f}B parameters "
         f"x {r35['image_tokens']} image tokens", {**pc, "model": rule, "train": 3 * rule, "reference": rule}, {})]
    return {label: {n: epoch_flops(per_call, dataclasses.replace(results[n]["args"], **flags), results[n]["schedule"])["total"]
                    for n in PAPER_TFLOPS} for label, per_call, flags in variants}


def flops_table(results):
    """Markdown report of preset_flops' results: per-epoch TFLOPs beside the paper's Table 4, and the accounting
    choices that explain the difference, computed."""
    TERA, pc, pc14, paper = 1e12, results["sd35"]["per_call"], results["sd14"]["per_call"], PAPER_TFLOPS
    table4 = {n: p * TERA for n, p in paper.items()}  # in FLOPs, like ours

    def speedups(tot):  # the baseline's FLOPs over Pro-GRPO's and over Flash's
        return f"{tot['sd35-baseline'] / tot['sd35']:.2f}x / {tot['sd35-baseline'] / tot['sd35-flash']:.2f}x"

    lines = ["## FLOPs per epoch (TFLOPs), torch.utils.flop_counter on SD3.5-Medium and SD-v1.4 built on the meta device", "",
             f"Per call: SD3.5-M guided evaluation (CFG pair, 512 px, 77 + 128 text tokens) {pc['model'] / TERA:.2f}, its train step "
             f"(+ LoRA backward) {pc['train'] / TERA:.2f}, reference forward {pc['reference'] / TERA:.2f}; SD-v1.4 guided evaluation "
             f"{pc14['model'] / TERA:.2f}, train step (full fine-tune) {pc14['train'] / TERA:.2f}. Per image: VAE decode "
             f"{pc['decode'] / TERA:.2f} (paper {PAPER_DECODE_TFLOPS}); reward {pc['reward'] / TERA:.3f} (CLIP-H image + text towers as "
             f"ClipScore runs them; the image tower alone {pc['reward_image'] / TERA:.3f}, paper {PAPER_REWARD_TFLOPS}).", "",
             "| preset | G -> K | NFE / group | sampling | checkpoint decode + reward | final decode + reward | update | total "
             "| paper Table 4 | ours / paper |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        kept = r["schedule"][-1][1] if r["schedule"] else r["args"].group_size
        cells = [name, f"{r['args'].group_size} -> {kept}", r["nfe"]]
        cells += [f"{r[k] / TERA:,.0f}" for k in ("sampling", "checkpoints", "final", "update", "total")]
        cells += [f"{paper[name]:,}", f"{r['total'] / TERA / paper[name]:.2f}"] if name in paper else ["-", "-"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    total = {n: r["total"] for n, r in results.items()}
    lines += ["", f"Speed-up over the baseline, sd35 / sd35-flash: {speedups(total)} (paper: 1.26x / 1.41x in its text, "
                  f"{speedups(paper)} from Table 4); sd14: {total['sd14-baseline'] / total['sd14']:.2f}x (no paper figure). "
                  f"Left out: the text encoders, run per prompt ({results['sd35']['text'] / TERA:,.0f} TFLOPs an sd35 epoch, "
                  f"{results['sd35']['text'] / total['sd35']:.2%}). sd14: B = 4 prompts (run.sh's per-GPU share), HPSv2.1 "
                  f"counted as the PickScore CLIP-H (both ViT-H-14).",
              "", "### Why ours differs from Table 4 (sd35 presets, TFLOPs per epoch, ours / paper in brackets)", "",
              "| accounting | sd35-baseline | sd35 | sd35-flash | speed-ups |", "|---|---|---|---|---|"]
    variants = accounting_variants(results)
    for label, v in [*variants.items(), ("paper Table 4", table4)]:
        cells = [f"{v[n] / TERA:,.0f} ({v[n] / table4[n]:.2f})" for n in paper]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {speedups(v)} |")
    # the closest accounting, by the totals and by the speed-ups (which a constant factor per model call leaves alone)
    gaps = {"totals": lambda v: max(abs(math.log(v[n] / table4[n])) for n in paper),
            "speed-ups": lambda v: max(abs(math.log(v[n] / v["sd35-baseline"] * table4["sd35-baseline"] / table4[n]))
                                       for n in ("sd35", "sd35-flash"))}
    lines.append("")
    for what, gap in gaps.items():  # the two closest: a near tie is worth seeing
        first, second = sorted(variants, key=lambda label: gap(variants[label]))[:2]
        lines.append(f"Closest to Table 4 in the {what}: '{first}' (within {math.exp(gap(variants[first])) - 1:.1%}), "
                     f"then '{second}' ({math.exp(gap(variants[second])) - 1:.1%}).")
    return "\n".join(lines)


COMPARE_METHODS = {  # the demo task's four ways to spend the same compute (`bash run.sh compare`)
    "grpo": dict(group_size=8, prune="none"),  # plain GRPO at the baseline group size (Flow-GRPO: G = 24)
    "grpo-expanded": dict(group_size=16, prune="none"),  # the expanded group, sampled and trained in full
    "static-ovf": dict(group_size=16, prune="none", ovf_after_sampling=4),  # sample 16, train the max-variance 4
    "pro-grpo": dict(group_size=16, prune="5:8,7:4"),  # expand 16, prune to 8 then 4 inside the loop
}


def compare(args):
    """Runs every method of COMPARE_METHODS for --compare_seeds seeds, each until it has spent --max_flops,
    then writes comparison.md and reward-vs-FLOPs / reward-vs-time plots into --output_dir."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.output_dir)
    results = {name: [main(dataclasses.replace(args, **changes, seed=seed, compare=False, output_dir=str(out / f"{name}-seed{seed}")))
                      for seed in range(args.compare_seeds)] for name, changes in COMPARE_METHODS.items()}
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
    report = (f"# Matched-compute comparison\n\nBudget {args.max_flops / 1e12:.3f} TFLOPs per run, {args.compare_seeds} seeds, "
              f"reward '{args.reward}', model '{args.pretrained_model_name_or_path}'; bands span min to max over seeds.\n\n"
              + "\n".join(rows) + "\n\n![reward against compute and time](comparison.png)\n")
    (out / "comparison.md").write_text(report)
    print(report)


if __name__ == "__main__":
    try:
        main(parse_args())
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
