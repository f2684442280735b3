"""Benchmark the fused step log-prob against eager PyTorch.

    python -m progrpo_kernels.bench            # full table (GPU: all paths; CPU: torch paths only, ~10 s idle)
    python -m progrpo_kernels.bench --quick    # tiny smoke run, a few seconds

Paths timed, forward and forward+backward (backward = gradient w.r.t. the model output v):
  triton  the fused kernels (progrpo_kernels.gaussian_step, backend="triton"); needs a CUDA GPU to time
  torch   the fp32 torch reference the tests pin (gaussian_step_logprob_torch, via backend="torch")
  eager   the eager formula as Flow-GRPO / DDPO write it (sde_logprob_eager / ddim_logprob_eager, tested
          equal to the reference and to progrpo.py's own step functions): upcast, step mean,
          log-density, mean over dims, and the KL through a second step mean from the reference output
Presets: sd35 = flow SDE step with KL (beta = 0.01 in Flow-GRPO), B in {12, 24, 48}, latents 16x64x64;
sd14 = DDIM step without KL (beta = 0 in DanceGRPO), B in {4, 8}, latents 4x64x64; fp32 and bf16.

GB/s is measured against the minimum bytes the fused kernels must move (same for every path), with
n_in input tensors of B*D elements (v, x, x_next, and v_ref with KL) of `size` bytes each:
    forward          n_in * size * B * D
    forward+backward (2 n_in + 1) * size * B * D     (backward re-reads the inputs, writes grad_v)
Peak extra memory: on CUDA, torch.cuda.max_memory_allocated during forward+backward minus the memory
held before it (the inputs). On CPU it is not measured ("n/a").
GPU timings use triton.testing.do_bench (median); CPU timings are the median wall clock of 15 reps after 2 warm-ups.
"""

import argparse
import platform
import statistics
import time

import torch

from . import triton_available
from .gaussian_step import ddim_logprob, ddim_logprob_eager, sde_logprob, sde_logprob_eager

PRESETS = {  # name: (sampler, latent shape per sample, batch sizes, uses KL)
    "sd35": ("flow", (16, 64, 64), (12, 24, 48), True),
    "sd14": ("ddim", (4, 64, 64), (4, 8), False),
}
QUICK_PRESETS = {"sd35": ("flow", (16, 8, 8), (3,), True), "sd14": ("ddim", (4, 8, 8), (2,), False)}


def make_case(sampler, batch, latent, dtype, device, use_kl):
    """Inputs of one step at mid-trajectory, and {path: function(v) -> (log_prob, kl)}."""
    gen = torch.Generator().manual_seed(0)
    v, x, x_next, v_ref = (torch.randn((batch, *latent), generator=gen).to(device, dtype) for _ in range(4))
    v_ref = v_ref if use_kl else None
    if sampler == "flow":  # sigmas 5 -> 6 of SD3.5's T=10 schedule, noise level 0.7
        sigma = torch.full((batch,), 0.70728, device=device)
        sigma_next = torch.full((batch,), 0.60215, device=device)
        sched = (sigma, sigma_next, 0.7 * torch.sqrt(sigma / (1 - sigma)))  # + std_dev_t
        paths = {
            "triton": lambda v: sde_logprob(v, x, x_next, *sched, v_ref=v_ref, backend="triton"),
            "torch": lambda v: sde_logprob(v, x, x_next, *sched, v_ref=v_ref, backend="torch"),
            "eager": lambda v: sde_logprob_eager(v, x, x_next, *sched, v_ref=v_ref),
        }
    else:  # SD-v1.4 scaled-linear betas, DDIM step t = 501 -> 481, eta 1
        alphas_cumprod = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2, 0)
        sched = (alphas_cumprod[501].expand(batch).to(device), alphas_cumprod[481].expand(batch).to(device), 1.0)
        paths = {
            "triton": lambda v: ddim_logprob(v, x, x_next, *sched, eps_ref=v_ref, backend="triton"),
            "torch": lambda v: ddim_logprob(v, x, x_next, *sched, eps_ref=v_ref, backend="torch"),
            "eager": lambda v: ddim_logprob_eager(v, x, x_next, *sched, eps_ref=v_ref),
        }
    return v.requires_grad_(), paths


def time_ms(fn, device, reps):
    """Median milliseconds of fn()."""
    if device.type == "cuda" and triton_available():
        import triton.testing

        return triton.testing.do_bench(fn, return_mode="median")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()  # warm-up: first-touch allocations
    fn()
    samples = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def bench_path(path_fn, v, device, reps):
    """(fwd ms, fwd+bwd ms, peak extra MB or None) of one path."""

    def forward():
        return path_fn(v)

    def forward_backward():
        log_prob, kl = path_fn(v)
        loss = log_prob.sum() + (kl.sum() if kl is not None else 0)
        torch.autograd.grad(loss, v)

    fwd, fwd_bwd = time_ms(forward, device, reps), time_ms(forward_backward, device, reps)
    peak_mb = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
        forward_backward()
        torch.cuda.synchronize()
        peak_mb = (torch.cuda.max_memory_allocated() - held) / 2**20
    return fwd, fwd_bwd, peak_mb


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, fp32 only: a smoke run")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    presets = QUICK_PRESETS if args.quick else PRESETS
    dtypes = (torch.float32,) if args.quick else (torch.float32, torch.bfloat16)
    reps = 1 if args.quick else 15
    run_triton = device.type == "cuda" and triton_available()
    if device.type == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = f"CPU ({platform.processor() or 'unknown'}, {torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}")
    if not run_triton:
        print("triton path not timed: Triton timing needs triton and a CUDA GPU (the CPU interpreter is a "
              "correctness tool, ~100x slower than torch)")
    header = (f"{'preset':6} {'B':>3} {'latent':>9} {'dtype':8} {'path':6} {'fwd ms':>9} {'f+b ms':>9} "
              f"{'fwd GB/s':>9} {'f+b GB/s':>9} {'peak MB':>8}")
    print(header)
    print("-" * len(header))
    for preset, (sampler, latent, batches, use_kl) in presets.items():
        for dtype in dtypes:
            for batch in batches:
                v, paths = make_case(sampler, batch, latent, dtype, device, use_kl)
                n_in = 4 if use_kl else 3
                elems_bytes = v.numel() * v.element_size()  # B * D * size
                for path, fn in paths.items():
                    if path == "triton" and not run_triton:
                        continue
                    fwd, fwd_bwd, peak_mb = bench_path(fn, v, device, reps)
                    fwd_gbs = n_in * elems_bytes / (fwd * 1e6)
                    fwd_bwd_gbs = (2 * n_in + 1) * elems_bytes / (fwd_bwd * 1e6)
                    peak = "n/a" if peak_mb is None else f"{peak_mb:.1f}"
                    print(f"{preset:6} {batch:>3} {'x'.join(map(str, latent)):>9} {str(dtype)[6:]:8} {path:6} "
                          f"{fwd:>9.3f} {fwd_bwd:>9.3f} {fwd_gbs:>9.1f} {fwd_bwd_gbs:>9.1f} {peak:>8}")


if __name__ == "__main__":
    main()
