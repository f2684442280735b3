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
the way Flow-GRPO writes it (sde_logprob_eager), runs about a dozen elementwise fp32 kernels over (B, D),
each reading one or two (B, D) tensors from HBM and writing one: roughly 30 tensor passes, over
100 bytes per element, and autograd keeps several fp32 (B, D) intermediates alive until backward.
The fused forward reads v, x, x_next (and v_ref) once and writes a partial sum per block of 1024
elements (1-2 fp32 scalars per sample after the final sum):
    fp32: 12 B/elem (16 with v_ref)        bf16/fp16: 6 B/elem (8 with v_ref)
The fused backward recomputes mean from the same inputs instead of saving it, and writes one gradient
in v's dtype:
    fp32: 16 B/elem (20 with v_ref)        bf16/fp16: 8 B/elem (10 with v_ref)
Nothing (B, D)-sized is saved for backward beyond the inputs themselves.

The Triton kernels (the two fused (B, D) sums and their autograd.Function) are in
_gaussian_step_triton.py, imported the first time the Triton backend runs (see progrpo_kernels/__init__.py for
why); this module turns the sums into log_prob and kl, so the dependency runs one way, from here to there.
The first Triton call of a process is checked against the fp32 reference (see `_self_check`).

`sde_logprob_eager` and `ddim_logprob_eager` are the baseline that bench.py times: the eager formula
as Flow-GRPO / DDPO write it (upcast, the step mean, the log-density, the mean over dims, and the KL
through a second step mean from the reference output). They are tested to equal the reference.

Not fused here: the PPO-clip surrogate. It acts on (B,) scalars (ratio = exp(logp_new - logp_old),
clip, max, mean), costs nothing next to the (B, D) pass, and written out in progrpo.py it is the part
of the method a reader most needs to see. Fusing it would save no memory traffic and hide the loss.
"""

import math

import torch

from . import resolve_backend, self_check_pending, settings, verify_against_reference

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)

# Tolerances of a fused result against the fp32 reference on the upcast inputs, used by the tests and by
# the first-use self-check alike. Forward: fp32 sums over D in a different order than torch differ by
# ~1e-7 relative; 1e-5 has 100x headroom and still fails on any real bug (a dropped tail block, a wrong
# constant, a missing 1/D).
FWD_RTOL = FWD_ATOL = 1e-5
GRAD_ATOL_SCALE = 1e-6  # times max |grad|: absorbs fp32 cancellation in x_next - mean (and GPU FMA)
FP16_SUBNORMAL_HALF_SPACING = 2**-25  # fp16 gradients below 2^-14 are subnormal, spaced 2^-24


def grad_tolerance(dtype, ref_grad):
    """(rtol, atol) of a gradient in `dtype` against the fp32 reference gradient `ref_grad`.

    The fused gradient is computed in fp32 and rounded once to v's dtype: the error is at most that
    dtype's unit roundoff (relative) plus fp32 noise. Triton's CPU interpreter truncates fp32 -> bf16
    instead of rounding to nearest (compiled Triton rounds), so there the bound for bf16 is one full ulp.
    """
    bf16 = 2**-7 if settings()[1] else 2**-8
    rtol = {torch.float32: 1e-5, torch.bfloat16: bf16 + 1e-5, torch.float16: 2**-11 + 1e-5}[dtype]
    atol = GRAD_ATOL_SCALE * ref_grad.abs().max().item()
    return rtol, atol + (FP16_SUBNORMAL_HALF_SPACING if dtype == torch.float16 else 0.0)


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


def _gaussian_step_triton(v, x, x_next, cx, cv, s, v_ref, kl_scale):
    """The fused path: the two (B,) residual sums from Triton, then the Gaussian constants in torch."""
    from ._gaussian_step_triton import GaussianStepSums  # imports triton on first use

    D = v[0].numel()
    detached_ref = None if v_ref is None else v_ref.detach()
    sq_sum, ref_sq_sum = GaussianStepSums.apply(v, x.detach(), x_next.detach(), detached_ref, cx, cv)
    log_prob = -sq_sum / (2 * s * s * D) - torch.log(s) - HALF_LOG_2PI
    return log_prob, (kl_scale * ref_sq_sum / D if v_ref is not None else None)


def _self_check(v, x, x_next, cx, cv, s, v_ref, kl_scale):
    """First Triton call of the process: forward and gradient must match the fp32 reference on these inputs.

    Runs the fused op and the reference (on the upcast inputs) once more on a detached copy of v, and
    compares log_prob, kl and the gradient of sum(log_prob) + sum(kl) with the tests' tolerances.
    Cost, once per process: one fused forward+backward and one fp32 torch forward+backward.
    """
    upcast = (lambda t: None if t is None else t.detach().float())
    with torch.enable_grad():
        v_fused, v_spec = v.detach().clone().requires_grad_(), v.detach().float().clone().requires_grad_()
        fused = _gaussian_step_triton(v_fused, x, x_next, cx, cv, s, v_ref, kl_scale)
        spec = gaussian_step_logprob_torch(v_spec, upcast(x), upcast(x_next), cx, cv, s, upcast(v_ref), kl_scale)
        grads = [torch.autograd.grad(sum(t.sum() for t in out if t is not None), inp)[0]
                 for out, inp in ((fused, v_fused), (spec, v_spec))]
    checks = [("log_prob", fused[0], spec[0], FWD_RTOL, FWD_ATOL)]
    if v_ref is not None:
        checks.append(("kl", fused[1], spec[1], FWD_RTOL, FWD_ATOL))
    checks.append(("grad_v", grads[0].float(), grads[1], *grad_tolerance(v.dtype, grads[1])))
    verify_against_reference("gaussian_step", v.dtype, checks)


def _gaussian_step(v, x, x_next, cx, cv, s, kl_scale, v_ref, backend):
    for name, t in (("x", x), ("x_next", x_next), ("v_ref", v_ref)):
        if t is not None and t.shape != v.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected the model output's {tuple(v.shape)}")
    if v_ref is None:
        kl_scale = None
    if resolve_backend(v.device, backend) == "torch":
        return gaussian_step_logprob_torch(v, x, x_next, cx, cv, s, v_ref, kl_scale)
    if self_check_pending("gaussian_step"):
        _self_check(v, x, x_next, cx, cv, s, v_ref, kl_scale)
    return _gaussian_step_triton(v, x, x_next, cx, cv, s, v_ref, kl_scale)


def _sde_coefficients(sigma, sigma_next, std_dev_t, v):
    """Flow-GRPO's step as (cx, cv, s, kl_scale), fp32 (B,) each (module docstring)."""
    sigma, sigma_next, std_dev_t = (_per_sample(t, v) for t in (sigma, sigma_next, std_dev_t))
    dt = sigma_next - sigma  # < 0
    cx = 1 + std_dev_t**2 * dt / (2 * sigma)
    cv = dt + std_dev_t**2 * (1 - sigma) * dt / (2 * sigma)
    return cx, cv, std_dev_t * torch.sqrt(-dt), cv**2 / (2 * std_dev_t**2)


def _ddim_coefficients(alpha_prod_t, alpha_prod_t_prev, eta, eps):
    """DDPO's step as (cx, cv, s, kl_scale), fp32 (B,) each (module docstring)."""
    if eta <= 0:
        raise ValueError(f"eta={eta}: a deterministic DDIM step has no log-prob; use eta > 0")
    a_t, a_prev = (_per_sample(t, eps) for t in (alpha_prod_t, alpha_prod_t_prev))
    var = ((1 - a_prev) / (1 - a_t)) * (1 - a_t / a_prev)
    std = eta * torch.sqrt(var)
    cx = torch.sqrt(a_prev) / torch.sqrt(a_t)
    cv = torch.sqrt(1 - a_prev - std**2) - torch.sqrt(a_prev) * torch.sqrt(1 - a_t) / torch.sqrt(a_t)
    return cx, cv, std, cv**2 / (2 * std**2)


def sde_logprob(v, x, x_next, sigma, sigma_next, std_dev_t, v_ref=None, backend=None):
    """Flow-GRPO SDE step: (log_prob, kl) fp32 (B,), kl None without v_ref; differentiable in v.

    v, x, x_next (and v_ref): (B, ...) in fp32/bf16/fp16; sigma, sigma_next, std_dev_t: (B,) or scalars.
    backend: "triton", "torch" or None (PROGRPO_KERNELS); see progrpo_kernels/__init__.py.
    """
    return _gaussian_step(v, x, x_next, *_sde_coefficients(sigma, sigma_next, std_dev_t, v), v_ref, backend)


def ddim_logprob(eps, x, x_next, alpha_prod_t, alpha_prod_t_prev, eta, eps_ref=None, backend=None):
    """DDPO DDIM step: (log_prob, kl) fp32 (B,), kl None without eps_ref; differentiable in eps.

    eps, x, x_next (and eps_ref): (B, ...) in fp32/bf16/fp16; alpha_prod_t(_prev): (B,) or scalars;
    eta: python float > 0. backend: "triton", "torch" or None (PROGRPO_KERNELS).
    """
    coefficients = _ddim_coefficients(alpha_prod_t, alpha_prod_t_prev, eta, eps)
    return _gaussian_step(eps, x, x_next, *coefficients, eps_ref, backend)


# ---- the eager baseline bench.py times ----------------------------------------------------------------

def _eager_logprob(mean_fn, v, x_next, s, v_ref, kl_std):
    """Log-density of x_next under mean_fn(v), averaged over dims, and the KL through a second mean.

    s, kl_std: (B, 1, ..., 1), the step's std and the KL's std (Flow-GRPO drops sqrt(-dt) from the latter).
    """
    dims = tuple(range(1, v.ndim))
    mean = mean_fn(v.float())
    log_prob = (-((x_next.detach().float() - mean) ** 2) / (2 * s**2) - torch.log(s) - HALF_LOG_2PI).mean(dims)
    if v_ref is None:
        return log_prob, None
    mean_ref = mean_fn(v_ref.detach().float())
    return log_prob, (((mean - mean_ref) ** 2).mean(dims, keepdim=True) / (2 * kl_std**2)).view(-1)


def sde_logprob_eager(v, x, x_next, sigma, sigma_next, std_dev_t, v_ref=None):
    """sde_logprob as Flow-GRPO's sde_step_with_logprob writes it, unfused: the benchmark's baseline."""
    sigma, sigma_next, std_dev_t = (_per_sample(t, v).view(-1, *(1,) * (v.ndim - 1))
                                    for t in (sigma, sigma_next, std_dev_t))
    x32, dt = x.detach().float(), sigma_next - sigma

    def mean_fn(v32):
        return x32 + v32 * dt + std_dev_t**2 / (2 * sigma) * (x32 + (1 - sigma) * v32) * dt

    return _eager_logprob(mean_fn, v, x_next, std_dev_t * torch.sqrt(-dt), v_ref, std_dev_t)


def ddim_logprob_eager(eps, x, x_next, alpha_prod_t, alpha_prod_t_prev, eta, eps_ref=None):
    """ddim_logprob as DDPO's ddim_step_with_logprob writes it, unfused: the benchmark's baseline."""
    a_t, a_prev = (_per_sample(t, eps).view(-1, *(1,) * (eps.ndim - 1)) for t in (alpha_prod_t, alpha_prod_t_prev))
    std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    x32 = x.detach().float()

    def mean_fn(eps32):
        x0_hat = (x32 - (1 - a_t).sqrt() * eps32) / a_t.sqrt()
        return a_prev.sqrt() * x0_hat + (1 - a_prev - std**2).sqrt() * eps32

    return _eager_logprob(mean_fn, eps, x_next, std, eps_ref, std)
