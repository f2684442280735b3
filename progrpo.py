"""Pro-GRPO: expand-and-prune GRPO for text-to-image flow and diffusion models, in one file.

Paper: Ge, Huang, Ai, Fan, Huang, He, "Expand and Prune: Maximizing Trajectory Diversity for Effective GRPO in
Generative Models", CVPR 2026, arXiv 2512.15347. No official code exists; where the paper is silent we follow the
baselines it compares against, Flow-GRPO (flow models, SD3.5-Medium) and DanceGRPO / DDPO (diffusion, SD-v1.4).

Why. GRPO's advantage A_i = (R_i - mean) / std is ~0 for the many rewards that cluster near their group's mean:
those trajectories teach nothing, yet each costs a full rollout. Pro-GRPO samples a larger group, predicts every
trajectory's final reward cheaply part-way through denoising, and keeps only the subset of largest reward variance.

One epoch:
  1. Draw B prompts; start G_max trajectories per prompt from independent noise (the expanded group).
  2. Denoise with a stochastic sampler (Flow-GRPO's SDE; DDIM with eta = 1), keeping latents and log-probs.
  3. At each checkpoint t_k (after t_k steps), reuse the model output that step t_k needs anyway to project each
     live trajectory to its final sample in one step; decode and score it: the proxy reward. No extra model call.
  4. Per prompt keep the K_k trajectories whose proxies have the largest variance (exact OVF); stop the rest.
  5. Finish the survivors; decode and score them: the rewards R.
  6. A = (R - mean_S) / (std_S + 1e-4) over each prompt's K survivors, clipped to |A| <= 5.
  7. PPO-clip GRPO update on the survivors' stored steps, plus a KL penalty to the frozen base model. Samples with
     A exactly 0 (a group of equal rewards) are dropped from it: Flow-GRPO's rule.

Equations. Flow models (x_sigma = (1 - sigma) x0 + sigma eps, sigma from 1 = noise to 0 = data, v predicted):
  SDE step     x_next = mean + std sqrt(-dt) z,  dt = sigma_next - sigma,  std = a sqrt(sigma / (1 - sigma'))
               mean   = x + v dt + std^2 / (2 sigma) (x + (1 - sigma) v) dt
  projection   x0_hat = x_t - sigma_t v_t        (the paper's x_T ~ x_{t_i} + (T - t_i) b_ODE)
Diffusion models (x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, a_t = alphas_cumprod[t], eps predicted):
  DDIM step    x_next = mean + std z,  std = eta sqrt((1 - a_prev) / (1 - a_t) (1 - a_t / a_prev))
               mean   = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - std^2) eps
  projection   x0_hat = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)
Both: log-prob = log N(x_next; mean, step std^2) averaged over C*H*W; OVF S* = argmax_{|S| = K} Var(R_S), whose
optimum is the j lowest and K - j highest; loss = mean(max(-A r, -A clip(r, 1 - eps, 1 + eps))) + beta KL.

Precision (--mixed_precision; README: Precision), as Flow-GRPO runs it through accelerate: frozen weights in the half
dtype, the denoiser's forward under torch.autocast (CPU's too: the tests see it), fp16 with a dynamic loss scaler;
trainable weights, optimiser state, step math, log-probs, advantages and the VAE in fp32. A step whose gradient holds
an inf or NaN is skipped; an epoch whose every step failed so stops the run before it saves (see main).

Departures from Flow-GRPO: (1) groups are expanded and pruned in the sampling loop (`--prune none`: plain GRPO);
(2) each trajectory has its own generator seeded by (seed, epoch, prompt, member), so a survivor is the
trajectory it would have been unpruned, up to float round-off; (3) advantages are normalised over each prompt's
survivors (`--global_std`: Flow-GRPO's per-prompt mean and one std over the epoch's rewards, all ranks'); (4) prompts
are drawn by one seeded permutation; (5) diffusion models follow DanceGRPO: DDPO's DDIM log-prob (the last step ends
at alphas_cumprod[0]), the trained steps in a random order per trajectory, `--full_finetune` with no KL term,
`--shared_noise` (a group starts from one latent; DanceGRPO's SD script shares one across all of a rank's groups);
(6) every trained sample weighs the same: the loss is a per-sample sum over the optimiser step's samples (Flow-GRPO
re-admits zero-advantage samples to fill equal micro-batches); (7) CFG's unconditional half keeps its gradient in
the update (Flow-GRPO's July 2025 snapshot detaches it) and is not computed at --guidance_scale 1; (8) the EMA steps
once per optimiser step, Flow-GRPO's after every micro-batch (README's defaults table: the effective decay).

Glossary: B prompts, G group size (G_max expanded), K survivors, T steps, x latents, sigma / sigma_next, dt,
a_t alphas_cumprod, `out` the guided model output in the sampler's terms (v or eps), `sched` the sampler's
per-step tensors, mean / std of a step, logp_old (sampling), logp_new (update), ratio, adv; `b_` a minibatch.

Layout: config, math, rollout, update, loop; then what a port edits (the model family); then plumbing. Optional
beside it: progrpo_kernels/ (fused Triton), progrpo_outputs.py (pictures, loggers, --eval_only). The analytics live
in repro/, which reads metrics.jsonl and prune_audit.jsonl. Run: `bash run.sh` (CPU demo), `python progrpo.py -h`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import json
import math
import os
import shutil
import sys
import time
import zipfile
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm


try:  # progrpo_kernels/ beside this file (optional): fused Triton kernels, the same numbers as the torch code here
    import progrpo_kernels
except ModuleNotFoundError as missing:
    if missing.name != "progrpo_kernels":
        raise
    progrpo_kernels = None
try:  # progrpo_outputs.py beside this file (optional): sample grids, loggers, model card, --eval_only
    import progrpo_outputs
except ModuleNotFoundError as missing:
    if missing.name != "progrpo_outputs":  # it is there but needs a package that is not: say so
        raise
    progrpo_outputs = None


# ---- Config. Defaults are `bash run.sh sd35` (a test keeps them equal): the paper's SD3.5-M Pro-GRPO setting.

def arg(default, help, low=-math.inf, high=2**31 - 1):  # an int flag is refused outside [low, high] (see validate)
    return field(default=default, metadata={"help": help, "low": low, "high": high})


@dataclass
class Args:
    # TRY NOT TO MODIFY: run plumbing
    pretrained_model_name_or_path: str = arg("stabilityai/stable-diffusion-3.5-medium",
                                             "hub id or local folder of a pipeline the model-family section supports")
    output_dir: str = arg("outputs/progrpo", "where metrics.jsonl, prune_audit.jsonl, sample grids and weights go")
    seed: int = arg(0, "seeds prompt order and every trajectory's noise", high=math.inf)
    mixed_precision: str = arg("fp16", "no | fp16 | bf16: autocast and frozen-weight dtype (fp16 adds a loss scaler)")
    prompts: str = arg("dataset/pickscore/train.txt", "training prompts, one per line")
    eval_prompts: str = arg("dataset/pickscore/test.txt", "held-out prompts, one per line")
    num_eval_prompts: int = arg(16, "evaluate on the first N held-out prompts", low=1)
    num_epochs: int = arg(300, "epochs; each samples B prompts, prunes, and updates", low=1)
    eval_every: int = arg(10, "evaluate (ODE sampling, held-out prompts, sample grid) every N epochs; 0 = never", low=0)
    checkpointing_steps: int = arg(50, "resumable checkpoint every N epochs (weights are saved at the end)", low=1)
    resume_from_checkpoint: str = arg("", "'latest' (newest complete checkpoint in --output_dir) or a folder")
    checkpoints_total_limit: int = arg(0, "keep at most N checkpoints, removing the oldest (0 = keep all)", low=0)
    report_to: str = arg("none", "none | tensorboard | wandb: live metrics, eval grids, advantage histograms")
    eval_only: str = arg("", "evaluate the weights in this output or checkpoint folder; train nothing")
    # ALGO LOGIC: sampling
    resolution: int = arg(512, "image side in pixels", low=16, high=4096)
    num_steps: int = arg(10, "T: SDE denoising steps per trajectory during training", low=1, high=1000)
    eval_steps: int = arg(40, "ODE steps for evaluation", low=1, high=1000)
    noise_level: float = arg(0.7, "flow models: SDE noise level a (Flow-GRPO 0.7); DDIM: eta (DanceGRPO 1.0)")
    guidance_scale: float = arg(4.5, "the family's guidance (CFG, distilled), used in sampling and in the update")
    max_sequence_length: int = arg(128, "T5 prompt tokens (families with a T5 encoder)", low=1, high=512)
    prompts_per_epoch: int = arg(48, "B: prompts per epoch (Flow-GRPO: 48)", low=1)
    sample_batch_size: int = arg(8, "trajectories per model call while sampling (a CFG pair counts once)", low=1)
    shared_noise: bool = arg(False, "DanceGRPO: a group's trajectories start from one latent (their SDE noise differs)")
    decode_batch_size: int = arg(16, "latents per VAE decode", low=1)
    reward_batch_size: int = arg(16, "images per reward-model call", low=1)
    # ALGO LOGIC: expand and prune
    group_size: int = arg(48, "G_max: trajectories started per prompt")
    prune: str = arg("5:24,7:12", "checkpoints 'step:survivors,...' (prune after `step` steps), or 'none'")
    ovf_after_sampling: int = arg(0, "static OVF: sample the whole group, train its max-variance K (0 = off)")
    uniform_after_sampling: int = arg(0, "Figure 2's control: sample the whole group, train a seeded uniform K of it")
    reward: str = arg("repro.scorers.PickScore", "a reward (see Rewards) or a weighted sum 'a:1.0,b:0.5'")
    # ALGO LOGIC: update
    learning_rate: float = arg(3e-4, "AdamW learning rate (Flow-GRPO LoRA: 3e-4); 0 = a dry run")
    adam_beta1: float = arg(0.9, "AdamW beta1")
    adam_beta2: float = arg(0.999, "AdamW beta2")
    adam_weight_decay: float = arg(1e-4, "AdamW weight decay")
    max_grad_norm: float = arg(1.0, "gradient clipping norm")
    train_batch_size: int = arg(8, "trajectories per update micro-batch (= --sample_batch_size: same shapes)", low=1)
    updates_per_epoch: int = arg(2, "optimiser steps per epoch, gradients accumulated in between (Flow-GRPO: 2)", low=1)
    timestep_fraction: float = arg(0.99, "train the first int(T * fraction) steps (Flow-GRPO: 0.99, 9 of 10)")
    clip_range: float = arg(1e-4, "PPO ratio clip epsilon (Flow-GRPO: 1e-4; log-probs are means over C*H*W)")
    adv_clip_max: float = arg(5.0, "advantages are clipped to [-adv_clip_max, adv_clip_max]")
    beta: float = arg(0.01, "KL penalty weight against the base model (adapter disabled)")
    global_std: bool = arg(False, "Flow-GRPO's baseline: per-prompt mean, one std over the epoch's rewards, all ranks")
    full_finetune: bool = arg(False, "train every denoiser weight instead of LoRA (DanceGRPO, SD-v1.4; --beta 0)")
    ema: bool = arg(True, "EMA of the trainable weights for evaluation and saving (Flow-GRPO: 0.9 every 8 steps)")
    gradient_checkpointing: bool = arg(False, "recompute activations in the backward: less memory, ~30% slower")
    rank: int = arg(32, "LoRA rank", low=1)
    lora_alpha: int = arg(64, "LoRA alpha (scale = alpha / rank)", low=1)


def parse_args(argv=None) -> Args:
    # a one-line usage: all the flags spelled out (-h lists them) would bury argparse's one-line error
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], usage="%(prog)s [--flag VALUE ...]",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    kinds = dict(bool=dict(action=argparse.BooleanOptionalAction), int=dict(type=int), float=dict(type=float),
                 str=dict(type=str))  # how a field of each type parses
    for f in dataclasses.fields(Args):
        help = f.metadata["help"].replace("%", "%%")  # argparse formats help strings with %
        parser.add_argument(f"--{f.name}", default=f.default, help=help, **kinds[f.type])
    return Args(**vars(parser.parse_args(argv)))


DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # --mixed_precision


class RunError(Exception):
    """A problem the user can fix (bad flag, missing file, NaN reward): printed as one line, exit code 2."""


def refuse(problems):
    """Raises the message of the first (wrong, message) pair that is wrong as a RunError."""
    for wrong, message in problems:
        if wrong:
            raise RunError(message)


def validate(args):
    """Every check that needs no model, so bad input fails before anything loads; returns the prune schedule."""
    # Int ranges (Args' low, high): ceilings only where more makes no sense: diffusers' schedulers have 1000 training
    # timesteps (DDIM refuses more steps), 4096 px is 4x the side SD3 was trained at, T5 reads 512 tokens. Any other
    # count past 2**31 - 1 is a slip of the keyboard that torch would overflow or allocate for (the seed is hashed).
    values, problems = dataclasses.asdict(args), []  # problems: (what is wrong, what to say), checked in order
    for f in dataclasses.fields(Args):
        value, low, high = values[f.name], f.metadata["low"], f.metadata["high"]
        if f.type == "float":  # every step, log-prob and loss is fp32 math: inf, NaN or 1e39 would poison it
            problems.append((not abs(value) <= torch.finfo(torch.float32).max,
                             f"--{f.name} must be a finite number within fp32's range (got {value})"))
        elif f.type == "int":
            problems += [(value < low, f"--{f.name} must be at least {low} (got {value})"),
                         (value > high, f"--{f.name} must be at most {high} (got {value})")]
    refuse(problems)
    parse_reward_spec(args.reward)
    try:
        schedule = parse_prune_schedule(args.prune, args.num_steps, args.group_size)
    except ValueError as e:
        raise RunError(str(e)) from None
    problems = [(not values[name] > 0, f"--{name} must be positive (got {values[name]})")
                for name in ("clip_range", "adv_clip_max", "max_grad_norm", "noise_level")]
    problems += [(values[name] < 0, f"--{name} must be at least 0 (got {values[name]})")
                 for name in ("learning_rate", "adam_weight_decay", "beta")]  # --learning_rate 0 is a dry run
    problems += [(not 0 <= values[name] < 1, f"--{name} must be in [0, 1) (got {values[name]})")
                 for name in ("adam_beta1", "adam_beta2")]
    for name, allowed in (("report_to", ("none", "tensorboard", "wandb")), ("mixed_precision", tuple(DTYPES))):
        message = f"--{name} must be {', '.join(allowed[:-1])} or {allowed[-1]} (got {getattr(args, name)!r})"
        problems.append((getattr(args, name) not in allowed, message))
    last = schedule[-1][1] if schedule else args.group_size  # the group left when sampling ends
    model, resume, out = args.pretrained_model_name_or_path, args.resume_from_checkpoint, Path(args.output_dir)
    is_hub_id = model.count("/") == 1 and not model.startswith((".", "/", "~")) and not os.path.exists(model)
    # os.path's tests, not Path's: they say False, not raise, for a name too long or with a NUL in it
    state = Path(resume) / "training_state.pt"  # torch.save writes a zip: a torn or foreign file is refused unread
    made = next((p for p in (out, *out.parents) if os.path.exists(p)), out)  # the output folder or the nearest above
    problems += [
        (args.ovf_after_sampling and not 2 <= args.ovf_after_sampling < last,
         f"--ovf_after_sampling {args.ovf_after_sampling} must be in [2, {last}) (the group at the end)"),
        (args.uniform_after_sampling and not 2 <= args.uniform_after_sampling < last,
         f"--uniform_after_sampling {args.uniform_after_sampling} must be in [2, {last}) (the group at the end)"),
        (args.ovf_after_sampling and args.uniform_after_sampling,
         "--ovf_after_sampling and --uniform_after_sampling exclude each other: give one"),
        (args.full_finetune and args.beta > 0, "--full_finetune has no frozen reference for the KL: use --beta 0"),
        (args.resolution % 16, f"--resolution must be a multiple of 16 (got {args.resolution})"),
        (not 0 < args.timestep_fraction <= 1 or int(args.num_steps * args.timestep_fraction) < 1,
         f"--timestep_fraction must be in (0, 1] and train at least one of the --num_steps {args.num_steps} steps "
         f"(got {args.timestep_fraction})"),
        (not is_hub_id and not os.path.isfile(Path(model) / "model_index.json"),
         f"--pretrained_model_name_or_path {model!r} is neither a hub id nor a folder with model_index.json"),
        (resume not in ("", "latest") and not (os.path.isfile(state) and zipfile.is_zipfile(state)),
         f"--resume_from_checkpoint {resume!r} is not a checkpoint folder (one with a whole training_state.pt)"),
        (not args.output_dir, "--output_dir is empty (give . for this folder)"),
        (not os.path.isdir(made), f"--output_dir {args.output_dir!r}: {str(made)!r} is a file, not a folder"),
        (os.path.isdir(made) and not os.access(made, os.W_OK), f"--output_dir {args.output_dir!r} is not writable"),
        ((args.report_to != "none" or args.eval_only) and not progrpo_outputs,
         "--report_to and --eval_only need progrpo_outputs.py beside progrpo.py"),
        (args.eval_only and not any(os.path.exists(Path(args.eval_only) / f) for f in WEIGHT_FILES),
         f"--eval_only {args.eval_only!r} is not a folder holding what a run saves ({' or '.join(WEIGHT_FILES)})"),
    ]
    refuse(problems)
    return schedule


# ---- ALGO LOGIC: the pure math. All of it runs in fp32, whatever the model dtype (bf16 overflows the mean).

def _per_sample(value, like):
    """(B,) schedule values -> (B, 1, ..., 1) so they broadcast over a latent batch of any rank."""
    return value.to(torch.float32).view(-1, *([1] * (like.ndim - 1)))


def gaussian_logprob(sample, mean, std):
    """log N(sample; mean, std^2) per element, constants included, averaged (not summed) over a sample's C*H*W
    elements, however laid out, as Flow-GRPO and DDPO do. The sample is data: no gradient flows into it."""
    return (-((sample.detach().float() - mean) ** 2) / (2 * std**2) - torch.log(std)
            - 0.5 * math.log(2 * math.pi)).mean(dim=tuple(range(1, mean.ndim)))


def flow_std(sigma, sigma_next, noise_level):
    """Flow-GRPO's per-step noise scale std_t = a sqrt(sigma / (1 - sigma')), (B,) fp32, where sigma' = sigma
    except at sigma = 1 (the first step, 1 - sigma = 0): there sigma' = sigma_next."""
    sigma, sigma_next = sigma.to(torch.float32), sigma_next.to(torch.float32)
    return noise_level * torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_next, sigma)))


def sde_step_with_logprob(v, x, sigma, sigma_next, noise_level, prev_sample=None, noise=None):
    """One Flow-GRPO SDE step from sigma to sigma_next, and the log-prob of the step taken.
    v, x: (B, ...) model output and latent; sigma, sigma_next: (B,); noise_level: the float a. Give
    prev_sample to score a stored step (the update), or noise ~ N(0, 1) to draw one. Returns (prev_sample,
    log_prob (B,), prev_sample_mean, std_dev_t (B,)); a = 0 is the Euler ODE step x + v dt, with log_prob None."""
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


def ddim_step_with_logprob(eps, x, alpha_prod_t, alpha_prod_t_prev, eta, prev_sample=None, noise=None):
    """One DDIM step (DDPO's ddim_step_with_logprob) and the log-prob of the step taken.
    eps, x: (B, ...) predicted noise and latent; alpha_prod_t, alpha_prod_t_prev: (B,) alphas_cumprod at t
    and at prev_t = t - 1000 / T (clamped at 0: the last step ends at alphas_cumprod[0]). eta = 1 is DDPM-like
    ancestral sampling, eta = 0 deterministic DDIM (log_prob None). Returns what sde_step_with_logprob does."""
    eps, x = eps.float(), x.float()
    a_t, a_prev = _per_sample(alpha_prod_t, x), _per_sample(alpha_prod_t_prev, x)
    x0_hat = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()  # what project_x0 gives
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std_dev_t = eta * variance.sqrt()
    mean = a_prev.sqrt() * x0_hat + (1 - a_prev - std_dev_t**2).sqrt() * eps
    if prev_sample is None:
        prev_sample = mean if eta == 0 else mean + std_dev_t * noise.float()
    log_prob = gaussian_logprob(prev_sample, mean, std_dev_t) if eta != 0 else None
    return prev_sample, log_prob, mean, std_dev_t.view(-1)


def ovf_select(rewards, k):
    """Optimal Variance Filtering: the increasing indices of the size-k subset of largest (population) variance.
    A max-variance subset is always the j lowest and the k - j highest rewards for some j (an interior member
    swapped for an outside value farther from the subset mean raises the variance), so sort once and scan j
    with prefix sums: O(G log G), exact. Equal rewards are ordered by index."""
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


def uniform_select(n, k, seed):
    """Figure 2's control arm: the increasing indices of a uniform random k-subset of range(n), drawn from `seed`."""
    return torch.sort(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]).values


def group_advantages(rewards, group_ids, eps=1e-4, clip=5.0, global_std=False):
    """A_i = (R_i - mean_g) / (std_g + eps) within each group g, population std, clipped to |A| <= clip; fp32 (N,).
    A group of equal rewards gets exactly 0, detected as max == min, not std == 0: the fp32 mean of equal values
    need not equal them, which leaves R_i - mean_g ~1e-7 (and a std ~1e-6). global_std: one std over all the
    rewards given (Flow-GRPO's baseline; main gives it the whole epoch's, gathered from every rank)."""
    rewards = rewards.to(torch.float32)
    _, gid = torch.unique(group_ids, return_inverse=True)  # (N,) group index 0..n_groups-1
    zeros = torch.zeros(int(gid.max()) + 1, device=rewards.device)
    count = zeros.index_add(0, gid, torch.ones_like(rewards))
    centred = rewards - (zeros.index_add(0, gid, rewards) / count)[gid]
    hi = torch.full_like(zeros, -math.inf).scatter_reduce(0, gid, rewards, "amax")
    lo = torch.full_like(zeros, math.inf).scatter_reduce(0, gid, rewards, "amin")
    if global_std:
        std = rewards.std(correction=0).expand_as(rewards)
    else:
        std = (zeros.index_add(0, gid, centred**2) / count).sqrt()[gid]
    adv = torch.where((hi == lo)[gid], 0.0, centred / (std + eps))
    return adv.clamp(-clip, clip)


def parse_prune_schedule(spec, num_steps, group_size):
    """'5:24,7:12' -> [(5, 24), (7, 12)]; 'none' -> []. Raises ValueError with a one-line reason."""
    if group_size < 2:
        raise ValueError(f"--group_size must be at least 2 (got {group_size}): GRPO compares within a group")
    if spec.strip().lower() in ("", "none"):
        return []
    schedule = []
    for item in spec.split(","):
        try:
            step, keep = (int(s) for s in item.split(":"))
        except ValueError:
            raise ValueError(f"--prune item {item!r} is not 'step:survivors' (example: --prune 5:24,7:12)") from None
        schedule.append((step, keep))
    steps, keeps = [s for s, _ in schedule], [k for _, k in schedule]
    if any(not 0 < s < num_steps for s in steps) or steps != sorted(set(steps)):
        raise ValueError(f"--prune checkpoints {steps} must be strictly increasing and inside (0, {num_steps}): "
                         "0 < step < --num_steps")
    if any(a <= b for a, b in zip([group_size] + keeps, keeps)):
        raise ValueError(f"--prune survivors {keeps} must strictly decrease from --group_size {group_size}")
    if keeps[-1] < 2:
        raise ValueError(f"--prune must keep at least 2 survivors per prompt (got {keeps[-1]})")
    return schedule


def live_counts(num_steps, group_size, schedule):
    """Trajectories alive when step i is evaluated; their sum is the transformer evaluations per group. Step i's
    output is computed for every live trajectory (a checkpoint's projection reuses it); its survivors take step i."""
    alive, keep_at = [group_size], dict(schedule)
    for i in range(num_steps - 1):
        alive.append(keep_at.get(i, alive[-1]))
    return alive


def ppo_clip_loss(logp_new, logp_old, adv, clip_range):
    """Flow-GRPO's clipped surrogate on (B,) log-probs; returns (loss, ratio)."""
    ratio = torch.exp(logp_new - logp_old)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped).mean(), ratio


# The sampler's schedule is a dict of (T,) tensors indexed by step: `sigma`, `sigma_next` for flow models,
# `alpha_prod_t`, `alpha_prod_t_prev` for DDIM; `i` is a (N,) tensor of step indices, one per trajectory.

def sampler_step(sched, i, out, x, noise_level, prev_sample=None, noise=None):
    """The schedule's step: Flow-GRPO SDE (noise_level = a) or DDPO DDIM (noise_level = eta)."""
    if "sigma" in sched:
        sigma, sigma_next = sched["sigma"][i], sched["sigma_next"][i]
        return sde_step_with_logprob(out, x, sigma, sigma_next, noise_level, prev_sample, noise)
    a_t, a_prev = sched["alpha_prod_t"][i], sched["alpha_prod_t_prev"][i]
    return ddim_step_with_logprob(out, x, a_t, a_prev, noise_level, prev_sample, noise)


def project_x0(sched, i, x, out):
    """One-step projection to the final sample, exact if the model output stayed constant from here on:
    flow x0_hat = x_sigma - sigma v (an Euler step to sigma = 0); eps x0_hat = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)."""
    if "sigma" in sched:
        return x.float() - _per_sample(sched["sigma"][i], x) * out.float()
    a_t = _per_sample(sched["alpha_prod_t"][i], x)
    return (x.float() - (1 - a_t).sqrt() * out.float()) / a_t.sqrt()


def step_logprob(sched, i, out, x, x_next, noise_level, out_ref=None):
    """Log-prob of stored steps x -> x_next under the current model output, and the KL to out_ref: for two Gaussians
    of one std, mean over C*H*W of (mean - mean_ref)^2 / (2 std^2), the flow std without sqrt(-dt) (Flow-GRPO)."""
    if progrpo_kernels is None:
        return step_logprob_torch(sched, i, out, x, x_next, noise_level, out_ref)
    if "sigma" in sched:
        sigma, sigma_next = sched["sigma"][i], sched["sigma_next"][i]
        std_dev_t = flow_std(sigma, sigma_next, noise_level)
        return progrpo_kernels.sde_logprob(out, x, x_next, sigma, sigma_next, std_dev_t, v_ref=out_ref)
    a_t, a_prev = sched["alpha_prod_t"][i], sched["alpha_prod_t_prev"][i]
    return progrpo_kernels.ddim_logprob(out, x, x_next, a_t, a_prev, noise_level, eps_ref=out_ref)


def step_logprob_torch(sched, i, out, x, x_next, noise_level, out_ref=None):
    """step_logprob in plain eager PyTorch: the step function's log-prob, and the KL from a second mean."""
    _, logp, mean, std = sampler_step(sched, i, out, x, noise_level, prev_sample=x_next)
    if out_ref is None:
        return logp, None
    mean_ref = sampler_step(sched, i, out_ref, x, noise_level, prev_sample=x_next)[2]
    return logp, ((mean - mean_ref) ** 2).mean(dim=tuple(range(1, mean.ndim))) / (2 * std**2)


# ---- ALGO LOGIC: rollout with expand and prune -------------------------------------------------------------

def trajectory_seed(seed, epoch, prompt, member):
    """A seed that depends only on the trajectory's identity: not on batch size, ranks, or pruning."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{epoch}/{prompt}/{member}".encode()).digest()[:8], "little") >> 1


def predict(pipe, sched, i, x, text, prompt_idx, args, batch_size):
    """The family's guided output for x (N, ...) at steps i (N,), prompts prompt_idx (N,), in micro-batches; fp32 v or
    eps. Sampling and the update both call it (same guidance, dtype, conditioning): the first update's ratio is 1."""
    dtype = DTYPES[args.mixed_precision]  # the forward under autocast in the half dtype; fp32 runs as it is
    out = []
    for b_x, b_i, b_p in zip(x.split(batch_size), i.split(batch_size), prompt_idx.split(batch_size)):
        with nullcontext() if dtype == torch.float32 else torch.autocast(x.device.type, dtype=dtype):
            out.append(guided_output(pipe, b_x, sched["timesteps"][b_i], text, b_p, args.guidance_scale))
    return torch.cat(out)


def score(pipe, x, prompts, reward_fn, args, stats):
    """Decode latents and score them in micro-batches: (N,) rewards and (N, n_terms) reward terms (build_reward's
    sum comes first). A NaN or inf reward stops the run: training on it would silently poison the weights."""
    rewards = []
    for s in range(0, len(x), args.reward_batch_size):
        chunk = x[s:s + args.reward_batch_size]
        images = torch.cat([decode(pipe, b) for b in chunk.split(args.decode_batch_size)])  # (n, 3, H, W) in [0, 1]
        r = reward_fn(images, prompts[s:s + len(chunk)]).float()
        rewards.append(r[:, None] if r.ndim == 1 else r)
    rewards = torch.cat(rewards)  # (N, 1 + n_terms)
    stats["decodes"] += len(x)  # each decoded image is scored once
    bad = (~torch.isfinite(rewards)).any(1).nonzero().flatten()
    if len(bad):
        raise RunError(f"reward is {rewards[bad[0]].tolist()} for prompt '{prompts[bad[0]]}'; "
                       "stopping instead of training on it")
    return rewards[:, 0], rewards[:, 1:]


def prune_groups(scores, kept, live, G, audit, step):
    """Rows of the kept trajectories, from (B, n) scores of the live ones (a row per prompt) and each prompt's kept
    positions in its row (B tensors); records in each prompt's audit the members alive at `step`, scores and kept."""
    B, n = scores.shape
    keep = torch.cat([p * n + k for p, k in enumerate(kept)])  # (B k,) flat rows
    members, kept = (live.view(B, -1) % G).tolist(), (live[keep].view(B, -1) % G).tolist()
    for p, a in enumerate(audit):
        a["checkpoints"].append(dict(step=step, members=members[p], proxy=scores[p].tolist(), kept=kept[p]))
    return keep


@torch.no_grad()
def rollout(pipe, text, prompts, reward_fn, args, epoch, schedule, prompt_ids=None, progress=False):
    """Sample G_max trajectories for each of the B prompts, pruning at the schedule's checkpoints. prompt_ids: the
    prompts' positions in the epoch's whole batch (default 0..B-1), which with the epoch seed every trajectory's noise,
    so a rank sampling a share of the batch samples what one process would. Returns the survivors, rows sorted by
    trajectory id = prompt * G_max + member: latents (N, T + 1, ...) fp32, log_probs (N, T), rewards (N,),
    reward_terms (N, n_terms), prompt_idx (N,), member (N,); the counters (NFE, images decoded) and the audit."""
    device = denoiser(pipe).device
    B, G, T = len(prompts), args.group_size, args.num_steps
    sched = sampler_schedule(pipe, T, args.resolution, device)
    shape = latent_shape(pipe, args.resolution)  # one trajectory's
    prompt_ids = list(range(B)) if prompt_ids is None else prompt_ids
    live = torch.arange(B * G)  # ids of the live trajectories, increasing, so each prompt's rows stay contiguous
    seeds = [trajectory_seed(args.seed, epoch, prompt_ids[j // G], j % G) for j in live.tolist()]
    generators = [torch.Generator(device).manual_seed(s) for s in seeds]
    x = torch.stack([torch.randn(shape, generator=g, device=device) for g in generators])  # (B G, ...) noise
    if args.shared_noise:  # DanceGRPO: every member starts from member 0's latent; each keeps its own SDE noise
        x = x[live // G * G]
    latents, log_probs = [x], []  # one (n_live, ...) entry per step; rows follow `live`
    keep_at, stats = dict(schedule), dict(nfe=0, decodes=0)
    audit = [dict(index=i, prompt=p, checkpoints=[]) for i, p in zip(prompt_ids, prompts)]
    for i in tqdm(range(T), desc=f"epoch {epoch} sampling", leave=False, disable=not progress):
        steps = torch.full((len(live),), i, device=device)  # (n_live,) the step index of every live trajectory
        out = predict(pipe, sched, steps, x, text, live // G, args, args.sample_batch_size)
        stats["nfe"] += len(live)  # one trajectory-step per live trajectory: nothing else calls the model
        if i in keep_at:
            # Pro-GRPO: project to x0 with the output step i needs anyway, decode, score, keep OVF subsets
            x0_hat = project_x0(sched, steps, x, out)
            proxy = score(pipe, x0_hat, [prompts[p] for p in live // G], reward_fn, args, stats)[0].view(B, -1)
            keep = prune_groups(proxy, [ovf_select(r, keep_at[i]) for r in proxy], live, G, audit, i)  # (B K_i,)
            # pruned trajectories stop here: drop their rows everywhere so their memory is released
            live, x, out, steps = live[keep], x[keep], out[keep], steps[keep]
            latents, log_probs = [lat[keep] for lat in latents], [lp[keep] for lp in log_probs]
        noise = torch.stack([torch.randn(shape, generator=generators[j], device=device) for j in live.tolist()])
        x, logp, _, _ = sampler_step(sched, steps, out, x, args.noise_level, noise=noise)
        latents.append(x)
        log_probs.append(logp)
    rewards, terms = score(pipe, x, [prompts[p] for p in live // G], reward_fn, args, stats)
    K = args.ovf_after_sampling or args.uniform_after_sampling  # prune once more, at the end (audited as step T)
    if K:
        final = rewards.view(B, -1)
        if args.ovf_after_sampling:  # the paper's static OVF, on the true final rewards
            kept = [ovf_select(r, K) for r in final]
        else:  # Figure 2's control arm: K members drawn uniformly whatever their rewards, seeded per prompt
            seeds = [trajectory_seed(args.seed, epoch, i, "uniform") for i in prompt_ids]
            kept = [uniform_select(final.shape[1], K, s) for s in seeds]
        keep = prune_groups(final, kept, live, G, audit, T)
        live, rewards, terms = live[keep], rewards[keep], terms[keep]
        latents, log_probs = [lat[keep] for lat in latents], [lp[keep] for lp in log_probs]
    for p, a in enumerate(audit):
        a.update(survivors=(live.view(B, -1)[p] % G).tolist(), final=rewards.view(B, -1)[p].tolist())
    samples = dict(latents=torch.stack(latents, 1), log_probs=torch.stack(log_probs, 1), rewards=rewards,
                   reward_terms=terms, prompt_idx=live // G, member=live % G)
    return samples, stats, audit


@torch.no_grad()
def sample_deterministic(pipe, text, args, num_steps, seed):
    """Evaluation images: the deterministic sampler (Euler ODE / DDIM eta = 0), one per prompt, fixed noise."""
    device, n = denoiser(pipe).device, len(text["embeds"])
    sched, shape = sampler_schedule(pipe, num_steps, args.resolution, device), latent_shape(pipe, args.resolution)
    generators = [torch.Generator(device).manual_seed(trajectory_seed(seed, "eval", p, 0)) for p in range(n)]
    x = torch.stack([torch.randn(shape, device=device, generator=g) for g in generators])  # (n, ...)
    for i in range(num_steps):
        steps = torch.full((n,), i, device=device)
        out = predict(pipe, sched, steps, x, text, torch.arange(n, device=device), args, args.sample_batch_size)
        x = sampler_step(sched, steps, out, x, 0.0)[0]
    return torch.cat([decode(pipe, b) for b in x.split(args.decode_batch_size)])


# ---- ALGO LOGIC: the GRPO update on the survivors ----------------------------------------------------------

def train_epoch(pipe, params, optimizer, scaler, samples, adv, text, args, epoch, ema=None, progress=False):
    """PPO-clip GRPO over the survivors' stored steps: recompute log-probs, clip, KL, AdamW. Each trajectory trains its
    first int(T * timestep_fraction) steps (flow: in order, Flow-GRPO; DDIM: in a random order, DanceGRPO); samples
    of advantage exactly 0 are left out. The micro-batches make `updates_per_epoch` optimiser steps (none if nothing
    is left), each sample weighing 1 / (the step's samples on all ranks x trained steps), gradients averaged over
    ranks before clipping. `scaler` scales the fp16 loss; `ema` (tensors or None) follows the weights; a step whose
    gradient holds an inf or NaN is skipped and counted. Returns per-(micro-batch, step) and per-step statistics."""
    model = denoiser(pipe)
    device = model.device
    sched = sampler_schedule(pipe, args.num_steps, args.resolution, device)
    n_train = int(args.num_steps * args.timestep_fraction)
    train_rows = (adv.cpu() != 0).nonzero().flatten()  # adv 0 (a group of equal rewards) teaches nothing: dropped
    g = torch.Generator().manual_seed(trajectory_seed(args.seed, epoch, "train", 0))
    order = torch.randperm(len(train_rows), generator=g)  # g's first draw; the steps' orders next
    minibatches = train_rows[order].split(args.train_batch_size) if len(train_rows) else ()  # full but the last
    if "sigma" in sched:  # flow models train their steps in order (Flow-GRPO), DDIM in a random one (DanceGRPO)
        step_order = torch.arange(n_train).repeat(len(adv), 1)  # (N, n_train)
    else:
        step_order = torch.stack([torch.randperm(n_train, generator=g) for _ in range(len(adv))])
    info = {k: [] for k in ("loss", "ratio", "approx_kl", "clipfrac", "kl", "first_step_ratio_dev", "grad_norm",
                            "skipped", "loss_scale")}
    info["zero_adv_dropped"] = [torch.tensor(len(adv) - len(train_rows))]
    bar = tqdm(total=len(minibatches) * n_train, desc=f"epoch {epoch} update", leave=False, disable=not progress)
    # every rank takes the same optimiser steps (each all-reduces the gradients), none if no rank has samples left
    n_updates = min(args.updates_per_epoch, max(gather(len(minibatches))))
    updates = torch.arange(len(minibatches)).tensor_split(n_updates) if n_updates else ()  # micro-batches per step
    for u, update in enumerate(updates):
        counts = gather(sum(len(minibatches[mb]) for mb in update.tolist()))  # the step's samples on each rank
        weight = len(counts) / (sum(counts) * n_train)  # per sample and step; x ranks: average_gradients divides
        for mb in update.tolist():
            b_idx = minibatches[mb]
            b_x = samples["latents"][b_idx]  # (b, T + 1, ...)
            b_logp_old, b_adv = samples["log_probs"][b_idx], adv[b_idx]  # (b, T), (b,)
            b_prompt, rows = samples["prompt_idx"][b_idx], torch.arange(len(b_idx))
            for j in range(n_train):
                steps = step_order[b_idx, j].to(device)  # (b,) which step each trajectory trains now
                x, x_next = b_x[rows, steps], b_x[rows, steps + 1]  # (b, ...) each
                out = predict(pipe, sched, steps, x, text, b_prompt, args, len(b_idx))
                out_ref = None
                if args.beta > 0:  # the reference policy is the base model: the same network, adapter off
                    model.disable_adapters()
                    with torch.no_grad():
                        out_ref = predict(pipe, sched, steps, x, text, b_prompt, args, len(b_idx))
                    model.enable_adapters()
                logp_new, kl = step_logprob(sched, steps, out, x, x_next, args.noise_level, out_ref)
                logp_old = b_logp_old[rows, steps]
                loss, ratio = ppo_clip_loss(logp_new, logp_old, b_adv, args.clip_range)
                if kl is not None:
                    loss = loss + args.beta * kl.mean()
                # the micro-batch's mean loss x its size is its per-sample sum; fp16 scales it to stay representable
                scaler.scale(loss * len(b_idx) * weight).backward()
                # statistics stay on the device: a .item() here would be a CPU-GPU sync point every step
                ratio = ratio.detach()
                info["loss"].append(loss.detach())
                info["ratio"].append(ratio.mean())
                info["approx_kl"].append(0.5 * ((logp_new.detach() - logp_old) ** 2).mean())
                info["clipfrac"].append(((ratio - 1).abs() > args.clip_range).float().mean())
                info["kl"].append(kl.detach().mean() if kl is not None else torch.zeros((), device=device))
                if u == 0:  # weights still as sampled: any deviation here is a rollout/update mismatch
                    info["first_step_ratio_dev"].append((ratio - 1).abs().max())
                bar.update()
        average_gradients(params)
        scaler.unscale_(optimizer)  # true gradients for clipping; fp16's scaler notes any inf/NaN here
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)  # inf/NaN if any gradient is
        finite = bool(torch.isfinite(grad_norm))  # CPU-GPU sync, once per optimiser step (fp16's scaler has its own)
        info["grad_norm"].append(grad_norm)
        info["skipped"].append(torch.tensor(float(not finite)))
        info["loss_scale"].append(torch.tensor(scaler.get_scale()))  # this step's: 1 outside fp16
        if finite:  # an inf/NaN gradient would poison the weights and AdamW's moments in every precision: skip it
            scaler.step(optimizer)
        scaler.update()  # fp16: after an inf/NaN gradient (found by unscale_) the scale halves
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:  # it reads the weights, which a skipped step left as they were
            ema_update(ema, params, step=epoch * args.updates_per_epoch + u)  # n: the optimiser step's index
    bar.close()
    return {k: torch.stack(v).float().cpu() if v else torch.zeros(0) for k, v in info.items()}


# ---- TRY NOT TO MODIFY: the training loop ------------------------------------------------------------------

def group_std(rewards):
    """Mean over prompts of the within-group population std of (B, n) rewards."""
    return rewards.std(1, correction=0).mean().item()


def epoch_metrics(epoch, rewards, terms, stats, audit, info, args, schedule):
    """One metrics.jsonl line from the survivors' rewards (B, K) and terms, the counters, audit and update."""
    metrics = {"epoch": epoch, "reward/mean": rewards.mean().item(), "reward/std": rewards.std(correction=0).item(),
               "reward/group_std": group_std(rewards),
               "reward/zero_std_groups": int((rewards.max(1).values == rewards.min(1).values).sum())}
    for (name, _, _), term in zip(parse_reward_spec(args.reward), terms.unbind(-1)):
        metrics[f"reward/{name}"] = term.mean().item()  # each term unweighted, beside the weighted sum
    metrics.update({"prune/started": args.group_size, "prune/kept": rewards.shape[1],
                    "prune/nfe_saved": 1 - stats["nfe"] / (len(rewards) * args.group_size * args.num_steps)})
    for k, (step, _) in enumerate(schedule):  # within-prompt proxy spread at each checkpoint, all live / kept
        checkpoints = [a["checkpoints"][k] for a in audit]
        kept = [[c["proxy"][c["members"].index(m)] for m in c["kept"]] for c in checkpoints]
        metrics[f"prune/group_std_before_{step}"] = group_std(torch.tensor([c["proxy"] for c in checkpoints]))
        metrics[f"prune/group_std_after_{step}"] = group_std(torch.tensor(kept))
    finite = info["grad_norm"][torch.isfinite(info["grad_norm"])]  # a skipped fp16 step has an inf norm
    first = info["first_step_ratio_dev"]  # empty, as every policy/ statistic, when nothing was left to train
    metrics.update({"perf/nfe_sample": stats["nfe"], "perf/decodes": stats["decodes"],
                    **{f"policy/{k}": info[k].mean().item() for k in ("loss", "approx_kl", "clipfrac", "kl")},
                    "policy/ratio_mean": info["ratio"].mean().item(),
                    "policy/first_step_ratio_dev": first.max().item() if len(first) else float("nan"),
                    "policy/grad_norm": finite.mean().item() if len(finite) else float("nan"),
                    "policy/skipped_steps": int(info["skipped"].sum()),
                    "policy/zero_adv_dropped": int(info["zero_adv_dropped"].sum())})  # all ranks'
    return metrics


def read_prompts(path, flag="prompts file"):
    """One prompt per line, UTF-8; a missing, unreadable, binary or empty file, or a folder: one line naming `flag`."""
    missing = f"{flag} '{path}' not found (one prompt per line; `bash run.sh sd35` fetches them)"
    refuse([(os.path.isdir(path), f"{flag} '{path}' is a folder, not a text file of prompts (one per line)"),
            (not os.path.isfile(path), missing)])
    try:
        text = Path(path).read_bytes().decode("utf-8", errors="replace")
    except OSError as e:  # no read permission, a failing disk
        raise RunError(f"{flag} '{path}' cannot be read ({e.strerror})") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    refuse([("\0" in text or "\ufffd" in text, f"{flag} '{path}' is binary or not UTF-8 text (one prompt per line)"),
            (not prompts, f"{flag} '{path}' has no prompts")])
    return prompts


def start_outputs(args, out_dir, start_epoch):
    """Rank 0's metrics and audit files (a resume keeps earlier epochs'), progrpo_outputs' (log, finish) or no-ops."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in (out_dir / "metrics.jsonl", out_dir / "prune_audit.jsonl"):
        lines = path.read_text().splitlines() if path.exists() else []
        path.write_text("".join(line + "\n" for line in lines if json.loads(line)["epoch"] < start_epoch))
    if progrpo_outputs is None:
        return (lambda *_: None), (lambda *_: None)
    return progrpo_outputs.start_run(args, out_dir)  # config.json now; tensorboard, curve, card as the run goes


def main(args):
    schedule = validate(args)
    rank, world, device = setup_distributed()
    if args.prompts_per_epoch % world:
        raise RunError(f"--prompts_per_epoch {args.prompts_per_epoch} must be a multiple of the {world} ranks "
                       "(whole groups per rank)")
    train_prompts = read_prompts(args.prompts, "--prompts")
    eval_prompts = read_prompts(args.eval_prompts, "--eval_prompts")[:args.num_eval_prompts]
    out_dir = Path(args.output_dir)
    checkpoint = find_checkpoint(out_dir, args.resume_from_checkpoint) if args.resume_from_checkpoint else None
    dtype = DTYPES[args.mixed_precision]
    reward_fn = build_reward(args.reward, device)
    pipe = load_pipeline(args.pretrained_model_name_or_path, dtype, args.full_finetune).to(device)
    if args.eval_only:  # saved weights, loaded by progrpo_outputs and evaluated as training evaluates; no training
        try:
            progrpo_outputs.load_trained_weights(pipe, args.eval_only, denoiser_key(pipe))
        except ValueError as e:  # a LoRA of another model, or a torn weights file
            raise RunError(str(e)) from None
        reward = evaluate(pipe, reward_fn, eval_prompts, args, out_dir / "eval_only.png")
        return progrpo_outputs.write_eval_only(args.eval_only, reward, len(eval_prompts), out_dir)
    if args.noise_level > 1 and "alpha_prod_t" in sampler_schedule(pipe, args.num_steps, args.resolution, device):
        raise RunError(f"--noise_level is DDIM's eta for this model: at most 1 (got {args.noise_level})")  # more: NaN
    torch.manual_seed(args.seed)  # the same LoRA initialisation on every rank
    params = trainable_parameters(pipe, args)
    if args.gradient_checkpointing:
        denoiser(pipe).enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # fp16 only: bf16 has fp32's range
    ema = [p.detach().clone() for p in params] if args.ema else None
    start_epoch, history = load_checkpoint(checkpoint, pipe, params, optimizer, scaler, ema) if checkpoint else (0, [])
    log, finish_outputs = start_outputs(args, out_dir, start_epoch) if rank == 0 else (None, None)
    alive = live_counts(args.num_steps, args.group_size, schedule)
    dense = args.group_size * args.num_steps
    trained = args.ovf_after_sampling or args.uniform_after_sampling or alive[-1]  # per prompt, into the update
    if rank == 0:
        print(f"device {device}, precision {args.mixed_precision}, {world} ranks, "
              f"{sum(p.numel() for p in params):,} trainable parameters, {len(train_prompts)} prompts")
        print(f"per prompt: {args.group_size} started -> {trained} trained; live per step {alive}; "
              f"NFE {sum(alive)} per group vs {dense} unpruned ({1 - sum(alive) / dense:.0%} saved)")
        per_rank = args.prompts_per_epoch // world * trained
        if per_rank % args.train_batch_size:  # SD3's outputs change with the batch shape: the ratio may show it
            print(f"note: {per_rank} trajectories per rank are not a multiple of --train_batch_size "
                  f"{args.train_batch_size}; the last micro-batch holds {per_rank % args.train_batch_size}")
    epochs = tqdm(range(start_epoch, args.num_epochs), desc="epochs", initial=start_epoch, total=args.num_epochs,
                  disable=rank != 0)
    for epoch in epochs:
        # ALGO LOGIC: 1-5 sample, prune, score. Each rank owns whole prompt groups: prompts rank, rank + world, ...
        g = torch.Generator().manual_seed(trajectory_seed(args.seed, epoch, "prompts", 0))
        pick = torch.randperm(len(train_prompts), generator=g)
        prompt_ids = list(range(rank, args.prompts_per_epoch, world))  # positions in the epoch's batch: seed the noise
        prompts = [train_prompts[pick[i % len(pick)]] for i in prompt_ids]  # a short prompt file repeats
        text = encode_prompts(pipe, prompts, args.max_sequence_length)
        t0 = time.time()
        samples, stats, audit = rollout(pipe, text, prompts, reward_fn, args, epoch, schedule, prompt_ids,
                                        progress=rank == 0)
        t1 = time.time()
        # ALGO LOGIC: 6-7 advantages over the survivors, then the clipped policy update
        advantages_fn = progrpo_kernels.group_advantages if progrpo_kernels else group_advantages  # same numbers
        rewards, groups = samples["rewards"], torch.tensor(prompt_ids)[samples["prompt_idx"]]  # (N,) each
        start = 0  # this rank's first row among the rewards normalised together
        if args.global_std:  # Flow-GRPO: one std over the whole epoch's rewards, every rank's, on every rank
            everyone = gather((rewards, groups))
            start = sum(len(r) for r, _ in everyone[:rank])
            rewards, groups = torch.cat([r for r, _ in everyone]), torch.cat([ids for _, ids in everyone])
        adv = advantages_fn(rewards, groups, clip=args.adv_clip_max, global_std=args.global_std)
        adv = adv[start:start + len(samples["rewards"])].to(device)
        for entry, row in zip(audit, adv.view(len(prompts), -1).tolist()):
            entry["adv"] = row  # the survivors' advantages, as trained
        info = train_epoch(pipe, params, optimizer, scaler, samples, adv, text, args, epoch, ema, progress=rank == 0)
        t2 = time.time()
        # TRY NOT TO MODIFY: gather every rank's groups, log, evaluate and save on rank 0
        # per-tensor weight sums, equal on every rank when in sync (only under torchrun: .cpu() syncs the GPU)
        checksum = torch.stack([p.detach().double().sum() for p in params]).cpu() if world > 1 else None
        mine = (samples["rewards"].view(len(prompts), -1), samples["reward_terms"].unflatten(0, (len(prompts), -1)))
        parts = gather((*mine, stats, audit, info, checksum))
        rewards = torch.cat([p[0] for p in parts])  # (B, K), rank-major order
        terms = torch.cat([p[1] for p in parts])  # (B, K, n_terms)
        stats = {k: sum(p[2][k] for p in parts) for k in stats}  # NFE, images decoded and scored
        audit = sorted((a for p in parts for a in p[3]), key=lambda a: a["index"])
        info = {k: torch.cat([p[4][k] for p in parts]) for k in info}
        if rank == 0:
            metrics = epoch_metrics(epoch, rewards, terms, stats, audit, info, args, schedule)
            metrics["time/sample_s"], metrics["time/train_s"] = t1 - t0, t2 - t1
            metrics["time/cumulative_s"] = (history[-1]["time/cumulative_s"] if history else 0.0) + t2 - t0
            if world > 1:  # 0 when every rank holds the same weights after the epoch's optimiser steps
                metrics["dist/weight_spread"] = max((p[5] - parts[0][5]).abs().max().item() for p in parts)
            last = epoch == args.num_epochs - 1
            grid = out_dir / "samples" / f"epoch_{epoch:04d}.png"
            if args.eval_every and (epoch % args.eval_every == 0 or last):
                with ema_weights(params, ema):
                    metrics["eval/reward_mean"] = evaluate(pipe, reward_fn, eval_prompts, args, grid)
            with open(out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
            with open(out_dir / "prune_audit.jsonl", "a") as f:
                f.writelines(json.dumps(dict(epoch=epoch, **a)) + "\n" for a in audit)
            history.append(metrics)
            log(metrics, history, grid if "eval/reward_mean" in metrics else None, adv)
            epochs.write(summary_line(metrics, args))
        # A run whose steps keep failing stops on every rank, before it saves. A step fails when it is skipped at a
        # loss scale <= 1: any skip in fp32 and bf16; fp16's scaler skips while it backs off from 2^16 (README).
        failed = info["skipped"].bool() & (info["loss_scale"] <= 1)
        if len(failed) and failed.all():  # an epoch with no step (every advantage 0) has not failed
            raise RunError(f"every optimiser step of epoch {epoch} had an inf/NaN loss or gradient (policy/loss "
                           f"{info['loss'].mean().item():.4g}) and was skipped; stopping before its checkpoint and the "
                           "final weights are written (its policy/ figures are in metrics.jsonl)")
        if rank == 0 and (epoch + 1) % args.checkpointing_steps == 0:
            save_checkpoint(out_dir / f"checkpoint-{epoch + 1}", epoch + 1, history, pipe, params, optimizer, scaler,
                            ema, args)
            if args.checkpoints_total_limit:  # the oldest go first, never the one just written
                for old in complete_checkpoints(out_dir)[:-args.checkpoints_total_limit]:
                    shutil.rmtree(old)
    if rank == 0:
        with ema_weights(params, ema):
            save_weights(pipe, out_dir, args.full_finetune)
        finish_outputs(history)  # reward_curve.png, the model card
        grids = f"grids {out_dir / 'samples'}, " if (out_dir / "samples").is_dir() else ""  # with progrpo_outputs
        print(f"done: metrics {out_dir / 'metrics.jsonl'}, audit {out_dir / 'prune_audit.jsonl'}, {grids}"
              f"weights in {out_dir}")
    if world > 1:
        torch.distributed.destroy_process_group()
    return history


def summary_line(m, args):
    """The one line printed per epoch."""
    line = (f"epoch {m['epoch']:4d} | reward {m['reward/mean']:.4f} (group std {m['reward/group_std']:.4f}) | "
            f"kept {m['prune/kept']}/{args.group_size} | nfe {m['perf/nfe_sample']} | loss {m['policy/loss']:+.4f} "
            f"ratio {m['policy/ratio_mean']:.5f} clipfrac {m['policy/clipfrac']:.2f} kl {m['policy/kl']:.2e}")
    if "eval/reward_mean" in m:
        line += f" | eval {m['eval/reward_mean']:.4f}"
    return line + f" | {m['time/sample_s']:.1f}s + {m['time/train_s']:.1f}s"


def evaluate(pipe, reward_fn, prompts, args, grid_path):
    """ODE samples on held-out prompts, one per prompt: their mean reward (and with progrpo_outputs, a grid PNG)."""
    text = encode_prompts(pipe, prompts, args.max_sequence_length)
    images = sample_deterministic(pipe, text, args, args.eval_steps, args.seed)
    if progrpo_outputs is not None:
        progrpo_outputs.save_grid(images, grid_path, ncol=min(4, len(prompts)), captions=prompts)
    return reward_fn(images, prompts)[:, 0].mean().item()  # build_reward's weighted sum


# ---- ALGO LOGIC: the model family -------------------------------------------------------------------------
# A port edits this section only: a row of FAMILIES (keyed by pipeline class), the functions it names. The sections
# above call guided_output, latent_shape, sampler_schedule, encode_prompts and decode without knowing the family.

def family(pipe):
    """The pipeline's row of FAMILIES (at the end of this section)."""
    return FAMILIES[type(pipe).__name__]


def denoiser_key(pipe):
    """The pipeline component being fine-tuned, and its folder name when saved: 'transformer' or 'unet'."""
    return "transformer" if hasattr(pipe, "transformer") else "unet"


def denoiser(pipe):
    """The network being fine-tuned: the pipeline's transformer or UNet."""
    return getattr(pipe, denoiser_key(pipe))


def load_pipeline(name_or_path, dtype, full_finetune=False):
    """A local folder or a hub id of a pipeline in FAMILIES -> the pipeline, frozen, loaded with its row's arguments
    and scheduler. Each component is loaded in its own dtype, never rounded first: the VAE in fp32 (an fp16 SD3 VAE
    overflows), a fully fine-tuned denoiser in fp32 (the trained master copy), the rest in `dtype`."""
    import diffusers
    trained = torch.float32 if full_finetune else dtype
    dtypes = dict(default=dtype, vae=torch.float32, transformer=trained, unet=trained)
    try:  # model_index.json first: an unsupported class is refused before any weight downloads
        name = diffusers.DiffusionPipeline.load_config(name_or_path)["_class_name"]
        if name not in FAMILIES:
            raise RunError(f"'{name_or_path}' is a {name}; supported: {', '.join(FAMILIES)}")
        pipe = diffusers.DiffusionPipeline.from_pretrained(name_or_path, dtype=dtypes, **FAMILIES[name].get("load", {}))
    except (OSError, ValueError) as e:
        raise RunError(f"could not load '{name_or_path}': {str(e).splitlines()[0]} "
                       "(gated hub models need `hf auth login` and an accepted licence)") from None
    if family(pipe).get("scheduler"):  # the sampler's scheduler, configured with the pipeline's own schedule
        pipe.scheduler = getattr(diffusers, family(pipe)["scheduler"]).from_config(pipe.scheduler.config)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
    return pipe


def trainable_parameters(pipe, args):
    """LoRA (peft) on the row's target modules, or the whole denoiser with --full_finetune; fp32 either way.
    With LoRA the base weights stay frozen in their dtype; the KL's reference is the network, adapter off."""
    from peft import LoraConfig
    model = denoiser(pipe)
    if args.full_finetune:  # DanceGRPO's choice for SD-v1.4: every UNet weight, loaded in fp32
        model.float().requires_grad_(True)
        return list(model.parameters())
    model.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.lora_alpha, init_lora_weights="gaussian",
                                 target_modules=family(pipe)["lora"]))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # fp32 weights for the optimiser, even with a half-precision base model
    return params


@torch.no_grad()
def encode_prompts(pipe, prompts, max_sequence_length):
    """The B prompts' conditioning, once per epoch: `embeds` (B, L, D) and the family's other per-prompt tensors,
    B rows each, and for classifier-free guidance `negative`: the empty prompt's, one row each."""
    device = denoiser(pipe).device
    encoders = [m for name, m in pipe.components.items() if name.startswith("text_encoder") and m is not None]
    for encoder in encoders:  # used once per epoch: on the device only while encoding (T5-XXL alone is ~9 GB)
        encoder.to(device)
    text = family(pipe)["encode"](pipe, prompts, max_sequence_length, device)
    for encoder in encoders:
        encoder.to("cpu")
    return text


def encode_sd1(pipe, prompts, max_sequence_length, device):
    """SD1.x/2.x: CLIP's last hidden states (B, 77, D), and the empty negative prompt's."""
    embeds, negative = pipe.encode_prompt(prompts, device, 1, True)  # negative: "" for every prompt
    return dict(embeds=embeds, negative=dict(embeds=negative[:1]))


def encode_sd3(pipe, prompts, max_sequence_length, device):
    """SD3: CLIP-L, CLIP-G and T5 tokens (B, 77 + L, D) and pooled CLIP (B, P), and the empty negative prompt's."""
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(  # every encoder reads the prompt; negative ""
        prompts, None, None, device=device, max_sequence_length=max_sequence_length)
    return dict(embeds=embeds, pooled=pooled, negative=dict(embeds=negative[:1], pooled=negative_pooled[:1]))


def encode_flux(pipe, prompts, max_sequence_length, device):
    """FLUX.1: T5's tokens (B, L, 4096) and CLIP-L's pooled output (B, 768); no negative prompt, zero text ids."""
    embeds, pooled, _ = pipe.encode_prompt(prompts, device=device, max_sequence_length=max_sequence_length)
    return dict(embeds=embeds, pooled=pooled)


def guided_output(pipe, x, t, text, rows, scale):
    """The family's guided output (its row's `output`), fp32 v or eps, for x (n, ...) at timesteps t, prompts rows."""
    return family(pipe)["output"](pipe, x, t, text, rows, scale)


def sd_cfg(pipe, x, t, text, rows, scale):
    """SD3's transformer or an SD1.x/2.x UNet under classifier-free guidance o = o_u + g (o_t - o_u), o_u on the empty
    prompt, both halves in one call; at g = 1 only o_t, the formula's value, is computed: CFG-free costs half. SD2.x's
    v-prediction (v = sqrt(a) eps - sqrt(1 - a) x0) returns as the sampler's eps = sqrt(a) v + sqrt(1 - a) x."""
    cond, xs, ts = {k: v[rows] for k, v in text.items() if k != "negative"}, x, t  # the trajectories' prompts
    if scale != 1:  # the unconditional half first
        negative = {k: v.expand(len(x), *v.shape[1:]) for k, v in text["negative"].items()}
        cond = {k: torch.cat([negative[k], v]) for k, v in cond.items()}
        xs, ts = torch.cat([x, x]), torch.cat([t, t])
    pooled = {"pooled_projections": cond["pooled"]} if "pooled" in cond else {}  # SD3's pooled CLIP
    o = denoiser(pipe)(xs, timestep=ts, encoder_hidden_states=cond["embeds"], return_dict=False, **pooled)[0].float()
    if scale != 1:
        o_uncond, o_text = o.chunk(2)
        o = o_uncond + scale * (o_text - o_uncond)
    if pipe.scheduler.config.get("prediction_type") == "v_prediction":
        a_t = _per_sample(pipe.scheduler.alphas_cumprod.to(x.device)[t], x)
        o = a_t.sqrt() * o + (1 - a_t).sqrt() * x.float()
    return o


def flux_distilled(pipe, x, t, text, rows, scale):
    """FLUX.1's transformer on packed latents x (n, tokens, 64) as FluxPipeline calls it: dev's distilled guidance is a
    model input (one call, no negative prompt; schnell has none), timestep t / 1000, image ids (0, row, col)."""
    from diffusers import FluxPipeline
    model, side = pipe.transformer, math.isqrt(x.shape[1])  # a square image's side, in patches
    guidance = torch.full((len(x),), scale, device=x.device) if model.config.guidance_embeds else None
    ids = dict(txt_ids=torch.zeros(text["embeds"].shape[1], 3, device=x.device),  # (tokens, 3) each
               img_ids=FluxPipeline._prepare_latent_image_ids(None, side, side, x.device, torch.float32))
    return model(hidden_states=x, timestep=t / 1000, guidance=guidance, encoder_hidden_states=text["embeds"][rows],
                 pooled_projections=text["pooled"][rows], return_dict=False, **ids)[0].float()


def latent_shape(pipe, resolution):
    """One trajectory's latent for a square image: (C, h, w), or with the row's `patch` p > 1, p x p tokens (h w, C)."""
    patch, channels = family(pipe)["patch"], denoiser(pipe).config.in_channels
    side = resolution // (pipe.vae_scale_factor * patch)
    return (channels, side, side) if patch == 1 else (side * side, channels)


def sampler_schedule(pipe, num_steps, resolution, device):
    """The sampler's (T,) tensors (see sampler_step) over the family's `steps` or the scheduler's. Flow: diffusers'
    sigmas (1 -> 0), model timestep 1000 sigma. DDIM: diffusers' timesteps (981, ..., 1 for T = 50), alphas_cumprod
    at t and at t - 1000 / T clamped at 0 (DDPO)."""
    scheduler, steps = pipe.scheduler, family(pipe)["steps"]
    kwargs = steps(pipe, num_steps, resolution) if steps else dict(num_inference_steps=num_steps)
    scheduler.set_timesteps(device=device, **kwargs)
    timesteps = scheduler.timesteps.to(device)
    if not hasattr(scheduler, "alphas_cumprod"):  # flow matching
        sigmas = scheduler.sigmas.to(device, torch.float32)  # (T + 1,), ends at 0
        return dict(timesteps=timesteps, sigma=sigmas[:-1], sigma_next=sigmas[1:])
    prev = (timesteps - scheduler.config.num_train_timesteps // num_steps).clamp(min=0)
    alphas = scheduler.alphas_cumprod.to(device, torch.float32)
    return dict(timesteps=timesteps, alpha_prod_t=alphas[timesteps], alpha_prod_t_prev=alphas[prev])


def flux_steps(pipe, num_steps, resolution):
    """FluxPipeline's sigmas, linspace(1, 1/T, T) shifted by mu, a line in the image's token count through
    (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift); schnell's scheduler shifts by neither."""
    import numpy as np
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    c = pipe.scheduler.config
    mu = calculate_shift(latent_shape(pipe, resolution)[0], c.base_image_seq_len, c.max_image_seq_len, c.base_shift,
                         c.max_shift)
    return dict(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)


@torch.no_grad()
def decode(pipe, x):
    """Latents -> images in [0, 1], (N, 3, H, W) fp32, through the fp32 VAE."""
    vae, p = pipe.vae, family(pipe)["patch"]
    if p > 1:  # tokens of p x p patches (N, h w, C p^2) -> (N, C, h p, w p), unpacked as FluxPipeline unpacks them
        n, side = len(x), math.isqrt(x.shape[1])
        x = x.view(n, side, side, -1, p, p).permute(0, 3, 1, 4, 2, 5).reshape(n, -1, side * p, side * p)
    latents = x / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
    images = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)


MMDIT_LORA = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
              "attn.add_v_proj", "attn.to_add_out"]  # Flow-GRPO's LoRA targets in SD3's and FLUX's attention
FAMILIES = {  # pipeline class -> guided output, text encoding, steps, latent patch, LoRA; where needed, load, scheduler
    "StableDiffusion3Pipeline": dict(output=sd_cfg, encode=encode_sd3, steps=None, patch=1, lora=MMDIT_LORA),
    "StableDiffusionPipeline": dict(  # SD1.x/2.x; DDPO's DDIM; no safety checker (it would censor what is scored)
        output=sd_cfg, encode=encode_sd1, steps=None, patch=1,
        lora=["to_q", "to_k", "to_v", "to_out.0"], load=dict(safety_checker=None), scheduler="DDIMScheduler"),
    "FluxPipeline": dict(  # FLUX.1-dev and -schnell; Flow-GRPO's LoRA targets (single-stream blocks: to_q/k/v only)
        output=flux_distilled, encode=encode_flux, steps=flux_steps, patch=2,
        lora=MMDIT_LORA + ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]),
}


# ---- ALGO LOGIC: rewards. One interface: images (N, 3, H, W) in [0, 1] and N prompts -> (N,) fp32 rewards.
# `--reward module.attr` names a factory: attr(device) loads its model once and returns reward_fn(images, prompts);
# repro/scorers.py holds the paper's (PickScore, HPSv2.1, CLIP score, ...) and DDPO's weight-free JPEG rewards.

def parse_reward_spec(spec):
    """'m.A' or 'm.A:1.0,m.B:0.1' -> [(name, weight, factory), ...], each factory imported: a one-line error if not."""
    terms = []
    for item in spec.split(","):
        name, _, weight = item.strip().partition(":")
        module, _, attr = name.rpartition(".")
        try:
            factory = getattr(importlib.import_module(module), attr)
        except (ValueError, TypeError, ImportError, AttributeError):  # no module part; TypeError: '..m.A', relative
            factory = None
        if not callable(factory):  # 'os.path' imports, but is no factory
            raise RunError(f"unknown reward {name!r}; give an importable module.attr (e.g. repro.scorers.PickScore) "
                           "or a weighted sum 'a:1.0,b:0.5'")
        try:
            number = float(weight or 1.0)
        except ValueError:
            number = math.nan  # refused below, with inf and nan
        if not math.isfinite(number):
            raise RunError(f"reward weight {weight!r} in {item!r} is not a finite number")
        terms.append((name, number, factory))
    return terms


def build_reward(spec, device):
    """The weighted sum of the named rewards: reward_fn(images, prompts) -> (N, 1 + n_terms), the sum first.
    Each term's model loads here, once; one that cannot (not cached offline, no licence) is a one-line error."""
    terms = []
    for name, weight, factory in parse_reward_spec(spec):
        try:
            terms.append((weight, factory(device)))
        except OSError as e:
            raise RunError(f"could not load the '{name}' reward model: {str(e).splitlines()[0]}") from None

    def reward_fn(images, prompts):
        parts = torch.stack([fn(images, prompts).float().cpu() for _, fn in terms], 1)  # (N, n_terms)
        weights = torch.tensor([w for w, _ in terms])
        return torch.cat([(parts * weights).sum(1, keepdim=True), parts], 1)

    return reward_fn


# ---- TRY NOT TO MODIFY: ranks, EMA, weights and checkpoints ------------------------------------------------

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


def gather(obj):
    """Every rank's `obj`, in rank order (a list of one without torchrun)."""
    if not torch.distributed.is_initialized():
        return [obj]
    parts = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, obj)
    return parts


def average_gradients(params):
    """DDP's job, spelled out: each gradient all-reduced in place and divided by the world size (no flat copy of
    all of them: 3.4 GB for the sd14 full fine-tune; ~400 LoRA tensors cost milliseconds per step)."""
    if not torch.distributed.is_initialized():
        return
    for p in params:
        if p.grad is None:  # a weight this rank's loss did not reach still takes part in the sum
            p.grad = torch.zeros_like(p)
        torch.distributed.all_reduce(p.grad)
        p.grad /= torch.distributed.get_world_size()


def ema_update(ema, params, step, decay=0.9, every=8):
    """Flow-GRPO's EMA schedule: every 8 optimiser steps, ema += (1 - d) (p - ema), d = min(0.9, (1 + n) / (10 + n)),
    once per optimiser step (Flow-GRPO applies it once per micro-batch: departure (8) in the module docstring)."""
    if (step + 1) % every == 0:
        d = min(decay, (1 + step) / (10 + step))
        for e, p in zip(ema, params):
            e.lerp_(p.detach(), 1 - d)


@contextmanager
def ema_weights(params, ema):
    """Temporarily load the EMA weights (for evaluation and saving); a no-op without --ema."""
    current = [p.detach().clone() for p in params] if ema is not None else []
    for p, e in zip(params, ema or []):
        p.data.copy_(e)  # .data: a copy outside autograd
    try:
        yield
    finally:
        for p, c in zip(params, current):
            p.data.copy_(c)


WEIGHT_FILES = ("pytorch_lora_weights.safetensors", "transformer", "unet")  # what save_weights writes


def save_weights(pipe, directory, full_finetune):
    """LoRA as pytorch_lora_weights.safetensors (`pipe.load_lora_weights(dir)` loads it), or the full denoiser as a
    diffusers model folder; each file renamed into place once written, so a killed save leaves the previous ones."""
    from peft.utils import get_peft_model_state_dict
    tmp, model, key = Path(directory) / ".saving", denoiser(pipe), denoiser_key(pipe)
    if full_finetune:
        model.save_pretrained(tmp / key)
    else:
        type(pipe).save_lora_weights(tmp, **{f"{key}_lora_layers": get_peft_model_state_dict(model),  # the weights,
                                             f"{key}_lora_adapter_metadata": model.peft_config["default"].to_dict()})
    for file in sorted(f for f in tmp.rglob("*") if f.is_file()):
        target = Path(directory) / file.relative_to(tmp)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(file, target)
    shutil.rmtree(tmp)  # only empty folders are left in it


def save_checkpoint(directory, epoch, history, pipe, params, optimizer, scaler, ema, args):
    """The weights users load (EMA if on) and training_state.pt with the rest (optimiser, fp16 scaler, EMA), renamed
    into place when complete: a run killed while writing it resumes from the previous checkpoint. No RNG state:
    every random draw after the LoRA initialisation comes from a generator seeded by (seed, epoch, ...)."""
    with ema_weights(params, ema):
        save_weights(pipe, directory, args.full_finetune)
    names = [n for n, p in denoiser(pipe).named_parameters() if p.requires_grad]  # which a resumed run must match
    state = dict(epoch=epoch, history=history, names=names, shapes=[tuple(p.shape) for p in params],
                 params=[p.detach().cpu() for p in params], optimizer=optimizer.state_dict(),
                 scaler=scaler.state_dict(), ema=None if ema is None else [e.cpu() for e in ema])
    torch.save(state, Path(directory) / "training_state.pt.tmp")
    os.replace(Path(directory) / "training_state.pt.tmp", Path(directory) / "training_state.pt")


def complete_checkpoints(output_dir):
    """The checkpoint-N folders in output_dir whose training_state.pt was written in full, oldest first."""
    done = [d for d in Path(output_dir).glob("checkpoint-*")
            if d.name.split("-")[1].isdigit() and (d / "training_state.pt").is_file()]
    return sorted(done, key=lambda d: int(d.name.split("-")[1]))


def find_checkpoint(output_dir, spec):
    """'latest' -> the newest complete checkpoint, or None (start fresh, as diffusers does: requeue scripts can
    always pass it); otherwise the named folder."""
    if spec != "latest":
        return Path(spec)
    done = complete_checkpoints(output_dir)
    if not done:
        print(f"--resume_from_checkpoint latest: no complete checkpoint in '{output_dir}' yet; starting fresh")
    return done[-1] if done else None


def load_checkpoint(directory, pipe, params, optimizer, scaler, ema):
    """Restores weights, optimiser, loss scaler and EMA in place; returns (first epoch to run, history)."""
    path = Path(directory) / "training_state.pt"
    try:  # data only (tensors, numbers, strings, lists, dicts): unpickling an object would run its class's code
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file, or one holding objects: refuse it, naming it
        raise RunError(f"checkpoint '{path}' is unreadable ({type(e).__name__}): truncated, or holding objects, "
                       "which are never unpickled; delete it to resume from an earlier one") from None
    names = [n for n, p in denoiser(pipe).named_parameters() if p.requires_grad]
    same = state["names"] == names and state["shapes"] == [tuple(p.shape) for p in params]
    if not same or (state["ema"] is None) != (ema is None):
        raise RunError(f"checkpoint '{path}' does not match this run's trainable weights "
                       "(model, --rank, --full_finetune, --ema)")
    for p, saved in zip(params + (ema or []), state["params"] + (state["ema"] or [])):
        p.data.copy_(saved)
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    return state["epoch"], state["history"]


if __name__ == "__main__":
    sys.modules.setdefault("progrpo", sys.modules[__name__])  # `--reward module.attr` code imports this same module
    try:
        main(parse_args())
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
