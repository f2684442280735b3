"""Fused log-prob (and KL) of an affine Gaussian sampler step, differentiable in the model output.

The math. Both samplers of the project take "affine Gaussian" steps. Per sample b, with the model
output v, the current latent x and the stored next latent x_next flattened to (B, D), and per-sample
fp32 schedule scalars cx, cv, s, kl_scale of shape (B,):

    mean        = cx[b] * x + cv[b] * v
    log_prob[b] = mean_D( -(x_next - mean)^2 / (2 s[b]^2) ) - log s[b] - 0.5 log(2 pi)
    kl[b]       = kl_scale[b] * mean_D( (v - v_ref)^2 )          (optional; v_ref = reference output)

The KL is the usual mean_D (mean_theta - mean_ref)^2 / (2 std_kl^2) with kl_scale = cv^2 / (2 std_kl^2),
since the two means differ only through cv * v. Gradients flow to v only (x, x_next, v_ref and the
schedule are data):

    dlog_prob/dv = cv (x_next - mean) / (s^2 D)          dkl/dv = 2 kl_scale (v - v_ref) / D

Flow-matching SDE step (Flow-GRPO), from sigma, sigma_next, std_dev_t, with dt = sigma_next - sigma < 0:
    cx = 1 + std_dev_t^2 dt / (2 sigma)      cv = dt + std_dev_t^2 (1 - sigma) dt / (2 sigma)
    s  = std_dev_t sqrt(-dt)                 kl_scale = cv^2 / (2 std_dev_t^2)   (no sqrt(-dt): Flow-GRPO)
DDIM step (DDPO), from alpha_prod_t = a_t, alpha_prod_t_prev = a_prev and eta > 0:
    var = ((1 - a_prev) / (1 - a_t)) (1 - a_t / a_prev)      std = eta sqrt(var)      s = std
    cx = sqrt(a_prev) / sqrt(a_t)      cv = sqrt(1 - a_prev - std^2) - sqrt(a_prev) sqrt(1 - a_t) / sqrt(a_t)
    kl_scale = cv^2 / (2 std^2)
A zero noise level (flow) or eta = 0 (DDIM) is a deterministic step and has no log-prob (s = 0).

Why fuse: memory traffic. The op is pure bandwidth (a few flops per element). Eager PyTorch, written
the way Flow-GRPO writes it (see bench.py), runs about a dozen elementwise fp32 kernels over (B, D),
each reading one or two (B, D) tensors from HBM and writing one: roughly 30 tensor passes, over
100 bytes per element, and autograd keeps several fp32 (B, D) intermediates alive until backward.
The fused forward reads v, x, x_next (and v_ref) once and writes a partial sum per block of 1024
elements (1-2 fp32 scalars per sample after the final sum):
    fp32: 12 B/elem (16 with v_ref)        bf16/fp16: 6 B/elem (8 with v_ref)
The fused backward recomputes mean from the same inputs instead of saving it, and writes one gradient
in v's dtype:
    fp32: 16 B/elem (20 with v_ref)        bf16/fp16: 8 B/elem (10 with v_ref)
Nothing (B, D)-sized is saved for backward beyond the inputs themselves.

The Triton kernels and their autograd.Function are in _gaussian_step_triton.py, imported the first
time the Triton backend runs (see kernels/__init__.py for why).

Not fused here: the PPO-clip surrogate. It acts on (B,) scalars (ratio = exp(logp_new - logp_old),
clip, max, mean), costs nothing next to the (B, D) pass, and written out in progrpo.py it is the part
of the method a reader most needs to see. Fusing it would save no memory traffic and hide the loss.
"""

import math

import torch

from . import resolve_backend

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def gaussian_step_logprob_torch(v, x, x_next, cx, cv, s, v_ref=None, kl_scale=None):
    """The spec: fp32 log_prob (B,) and kl (B,) or None, differentiable in v only (see module docstring)."""
    if (v_ref is None) != (kl_scale is None):
        raise ValueError("pass v_ref and kl_scale together, or neither")
    B = v.shape[0]
    cx, cv, s = (t.detach().float().reshape(B, 1) for t in (cx, cv, s))  # (B, 1) per-sample columns
    v32 = v.reshape(B, -1).float()  # (B, D), still attached to v's graph
    x32 = x.detach().reshape(B, -1).float()
    x_next32 = x_next.detach().reshape(B, -1).float()
    mean = cx * x32 + cv * v32
    log_prob = (-((x_next32 - mean) ** 2) / (2 * s**2)).mean(1) - torch.log(s[:, 0]) - HALF_LOG_2PI
    kl = None
    if v_ref is not None:
        kl = kl_scale.detach().float() * ((v32 - v_ref.detach().reshape(B, -1).float()) ** 2).mean(1)
    return log_prob, kl


def _per_sample(t, v):
    """A schedule value (python float, 0-d or (B,) tensor) as a contiguous fp32 (B,) tensor on v's device."""
    return torch.as_tensor(t, dtype=torch.float32, device=v.device).reshape(-1).expand(v.shape[0]).contiguous()


def _gaussian_step(v, x, x_next, cx, cv, s, v_ref, kl_scale, backend):
    for name, t in (("x", x), ("x_next", x_next), ("v_ref", v_ref)):
        if t is not None and t.shape != v.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected the model output's {tuple(v.shape)}")
    if v_ref is None:
        kl_scale = None
    if resolve_backend(v.device, backend) == "torch":
        return gaussian_step_logprob_torch(v, x, x_next, cx, cv, s, v_ref, kl_scale)
    from ._gaussian_step_triton import GaussianStepLogProb  # imports triton on first use

    detached_ref = None if v_ref is None else v_ref.detach()
    log_prob, kl = GaussianStepLogProb.apply(v, x.detach(), x_next.detach(), detached_ref, cx, cv, s, kl_scale)
    return log_prob, (kl if v_ref is not None else None)


def sde_logprob(v, x, x_next, sigma, sigma_next, std_dev_t, v_ref=None, backend=None):
    """Flow-GRPO SDE step: (log_prob, kl) fp32 (B,), kl None without v_ref; differentiable in v.

    v, x, x_next (and v_ref): (B, ...) in fp32/bf16/fp16; sigma, sigma_next, std_dev_t: (B,) or scalars.
    backend: "triton", "torch" or None (PROGRPO_KERNELS); see kernels/__init__.py.
    """
    sigma, sigma_next, std_dev_t = (_per_sample(t, v) for t in (sigma, sigma_next, std_dev_t))
    dt = sigma_next - sigma  # < 0
    cx = 1 + std_dev_t**2 * dt / (2 * sigma)
    cv = dt + std_dev_t**2 * (1 - sigma) * dt / (2 * sigma)
    s = std_dev_t * torch.sqrt(-dt)
    kl_scale = cv**2 / (2 * std_dev_t**2)
    return _gaussian_step(v, x, x_next, cx, cv, s, v_ref, kl_scale, backend)


def ddim_logprob(eps, x, x_next, alpha_prod_t, alpha_prod_t_prev, eta, eps_ref=None, backend=None):
    """DDPO DDIM step: (log_prob, kl) fp32 (B,), kl None without eps_ref; differentiable in eps.

    eps, x, x_next (and eps_ref): (B, ...) in fp32/bf16/fp16; alpha_prod_t(_prev): (B,) or scalars;
    eta: python float > 0. backend: "triton", "torch" or None (PROGRPO_KERNELS).
    """
    if eta <= 0:
        raise ValueError(f"eta={eta}: a deterministic DDIM step has no log-prob; use eta > 0")
    a_t, a_prev = (_per_sample(t, eps) for t in (alpha_prod_t, alpha_prod_t_prev))
    var = ((1 - a_prev) / (1 - a_t)) * (1 - a_t / a_prev)
    std = eta * torch.sqrt(var)
    cx = torch.sqrt(a_prev) / torch.sqrt(a_t)
    cv = torch.sqrt(1 - a_prev - std**2) - torch.sqrt(a_prev) * torch.sqrt(1 - a_t) / torch.sqrt(a_t)
    kl_scale = cv**2 / (2 * std**2)
    return _gaussian_step(eps, x, x_next, cx, cv, std, eps_ref, kl_scale, backend)
