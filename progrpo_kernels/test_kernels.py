"""Tests for progrpo_kernels/: Triton == torch reference == the baselines' own step functions.

Without a GPU the Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set before triton
is imported), so shapes are small and odd. Run: TRITON_INTERPRET=1 python -m pytest -q progrpo_kernels/test_kernels.py
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton / progrpo_kernels are imported

import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

import progrpo_kernels  # noqa: E402
from progrpo_kernels import gaussian_step_logprob_torch, group_advantages, group_advantages_torch  # noqa: E402
from progrpo_kernels import ddim_logprob, sde_logprob  # noqa: E402
from progrpo_kernels import advantages, gaussian_step  # noqa: E402
from progrpo_kernels.advantages import adv_tolerance  # noqa: E402  (the tolerance the self-check uses too)
from progrpo_kernels.gaussian_step import FWD_ATOL, FWD_RTOL, GRAD_ATOL_SCALE, grad_tolerance  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(__file__).resolve().parents[1] / "repro" / "reference"  # absent if copied alone
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
LOWP = (torch.float32, torch.bfloat16, torch.float16)
# D = 315 (< one block, odd), 2048 (exactly two blocks), 3102 (three full blocks and a 30-element tail).
SHAPES = [(3, 5, 7, 9), (2, 4, 16, 32), (3, 2, 33, 47)]

# The forward, gradient and advantage tolerances (and why they hold) are in gaussian_step.py and
# advantages.py, so that the first-use self-check applies the same ones.
BASELINE_TOL = 1e-5  # DESIGN.md: |ours - ref| <= 1e-5 (1 + |ref|)


def assert_within(ours, ref, tol):
    """|ours - ref| <= tol (1 + |ref|) elementwise, the DESIGN.md convention for the reference vectors."""
    err = (ours.double() - ref.double()).abs() - tol * (1 + ref.double().abs())
    assert err.max() <= 0, f"exceeds {tol} (1 + |ref|) by {err.max().item():.3g}"


def flow_schedule(batch, gen):
    sigma = 0.2 + 0.75 * torch.rand(batch, generator=gen)
    sigma_next = sigma - 0.02 - 0.13 * torch.rand(batch, generator=gen)
    return sigma.to(DEVICE), sigma_next.to(DEVICE), (0.7 * torch.sqrt(sigma / (1 - sigma))).to(DEVICE)


# ---- fused Gaussian step: Triton vs the fp32 reference ----------------------------------------------

@pytest.mark.parametrize("with_ref", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", LOWP)
def test_gaussian_step_triton_and_torch_lowp_match_fp32_reference(dtype, shape, with_ref):
    """log_prob, kl and grad_v of both backends on low-precision inputs equal the fp32 spec on the upcast inputs."""
    gen = torch.Generator().manual_seed(100 * LOWP.index(dtype) + 10 * SHAPES.index(shape) + with_ref)
    v, x, z, v_ref = (torch.randn(shape, generator=gen).to(DEVICE, dtype) for _ in range(4))
    x_next = (x.float() - 0.1 * v.float() + 0.3 * z.float()).to(dtype)
    v_ref = v_ref if with_ref else None
    sched = flow_schedule(shape[0], gen)
    w_logp, w_kl = torch.randn(2, shape[0], generator=gen).to(DEVICE)  # per-sample upstream gradients

    def run(v_in, backend, upcast):
        cast = (lambda t: None if t is None else t.float()) if upcast else (lambda t: t)
        v_in = v_in.detach().clone().requires_grad_()
        log_prob, kl = sde_logprob(v_in, cast(x), cast(x_next), *sched, v_ref=cast(v_ref), backend=backend)
        loss = (w_logp * log_prob).sum() + ((w_kl * kl).sum() if with_ref else 0)
        (grad,) = torch.autograd.grad(loss, v_in)
        return log_prob, kl, grad

    ref_logp, ref_kl, ref_grad = run(v.float(), "torch", upcast=True)
    grad_rtol, grad_atol = grad_tolerance(dtype, ref_grad)
    for backend in ("torch", "triton"):
        log_prob, kl, grad = run(v, backend, upcast=False)
        assert log_prob.dtype == torch.float32 and log_prob.shape == (shape[0],)
        torch.testing.assert_close(log_prob, ref_logp, rtol=FWD_RTOL, atol=FWD_ATOL)
        if with_ref:
            assert kl.dtype == torch.float32
            torch.testing.assert_close(kl, ref_kl, rtol=FWD_RTOL, atol=FWD_ATOL)
        else:
            assert kl is None
        assert grad.dtype == dtype and grad.shape == v.shape
        torch.testing.assert_close(grad.float(), ref_grad, rtol=grad_rtol, atol=grad_atol)


@pytest.mark.parametrize("v_dtype, x_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16)])
def test_triton_mixed_input_dtypes_match_fp32_reference(v_dtype, x_dtype):
    """A bf16 output with fp32 latents (launched as is) and fp16 latents with an fp32 output (upcast) match the spec."""
    gen = torch.Generator().manual_seed(12)
    v, x, x_next, v_ref = (torch.randn(3, 2, 33, 47, generator=gen).to(DEVICE) for _ in range(4))
    v, v_ref, x, x_next = v.to(v_dtype), v_ref.to(v_dtype), x.to(x_dtype), x_next.to(x_dtype)
    sched = flow_schedule(3, gen)
    results = []
    for backend, cast in (("torch", lambda t: t.float()), ("triton", lambda t: t)):
        v_in = cast(v).detach().requires_grad_()
        log_prob, kl = sde_logprob(v_in, cast(x), cast(x_next), *sched, v_ref=cast(v_ref), backend=backend)
        results.append((log_prob, kl, *torch.autograd.grad(log_prob.sum() + kl.sum(), v_in)))
    (ref_logp, ref_kl, ref_grad), (log_prob, kl, grad) = results
    torch.testing.assert_close(log_prob, ref_logp, rtol=FWD_RTOL, atol=FWD_ATOL)
    torch.testing.assert_close(kl, ref_kl, rtol=FWD_RTOL, atol=FWD_ATOL)
    assert grad.dtype == v_dtype
    grad_rtol, grad_atol = grad_tolerance(v_dtype, ref_grad)
    torch.testing.assert_close(grad.float(), ref_grad, rtol=grad_rtol, atol=grad_atol)


def test_reference_gradient_is_the_closed_form():
    """The spec's autograd gradient equals cv (x_next - mean) / (s^2 D) + 2 kl_scale (v - v_ref) / D."""
    gen = torch.Generator().manual_seed(1)
    v, x, x_next, v_ref = (torch.randn(3, 35, generator=gen, dtype=torch.float64) for _ in range(4))
    cx, cv, s, kl_scale = (0.5 + torch.rand(3, generator=gen, dtype=torch.float64) for _ in range(4))
    v.requires_grad_()
    log_prob, kl = gaussian_step_logprob_torch(v, x, x_next, cx, cv, s, v_ref, kl_scale)
    (grad,) = torch.autograd.grad(log_prob.sum() + kl.sum(), v)
    mean = cx[:, None] * x + cv[:, None] * v.detach()
    expected = (cv[:, None] * (x_next - mean) / (s[:, None] ** 2 * 35)
                + 2 * kl_scale[:, None] * (v.detach() - v_ref) / 35)
    torch.testing.assert_close(grad.double(), expected, rtol=1e-5, atol=1e-7)


def test_triton_accepts_non_contiguous_inputs():
    """A strided (channels-last) model output gives the same values and a gradient of v's shape."""
    gen = torch.Generator().manual_seed(2)
    v, x, x_next = (torch.randn(3, 5, 7, 9, generator=gen).to(DEVICE) for _ in range(3))
    v_strided = v.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2).requires_grad_()
    sched = flow_schedule(3, gen)
    ref, _ = sde_logprob(v, x, x_next, *sched, backend="torch")
    log_prob, _ = sde_logprob(v_strided, x, x_next, *sched, backend="triton")
    torch.testing.assert_close(log_prob, ref, rtol=FWD_RTOL, atol=FWD_ATOL)
    (grad,) = torch.autograd.grad(log_prob.sum(), v_strided)
    assert grad.shape == v.shape


def test_eager_path_timed_by_bench_equals_the_reference():
    """bench.py's eager baseline gives the reference's log_prob and KL (like is timed with like), flow and DDIM.
    That progrpo.py's own torch path gives the same numbers is tested in test_progrpo.py."""
    gen = torch.Generator().manual_seed(3)
    v, x, x_next, v_ref = (torch.randn(3, 4, 6, 6, generator=gen).to(DEVICE) for _ in range(4))
    sigma, sigma_next, std_dev_t = flow_schedule(3, gen)  # std_dev_t is Flow-GRPO's for noise level 0.7
    ours = sde_logprob(v, x, x_next, sigma, sigma_next, std_dev_t, v_ref=v_ref, backend="torch")
    eager = gaussian_step.sde_logprob_eager(v, x, x_next, sigma, sigma_next, std_dev_t, v_ref=v_ref)
    for a, b in zip(ours, eager):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    a_t, a_prev = torch.tensor([0.05, 0.3, 0.6], device=DEVICE), torch.tensor([0.06, 0.33, 0.65], device=DEVICE)
    ours = ddim_logprob(v, x, x_next, a_t, a_prev, 1.0, eps_ref=v_ref, backend="torch")
    eager = gaussian_step.ddim_logprob_eager(v, x, x_next, a_t, a_prev, 1.0, eps_ref=v_ref)
    for a, b in zip(ours, eager):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


# ---- the baselines' own step functions (repro/reference/baseline_steps.pt) -------------------------

@pytest.fixture(scope="module")
def baseline():
    if not REFERENCE_DIR.is_dir():
        pytest.skip(f"reference vectors folder {REFERENCE_DIR} is absent")
    return torch.load(REFERENCE_DIR / "baseline_steps.pt")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sde_logprob_reproduces_flow_grpo(baseline, backend):
    """sde_logprob reproduces Flow-GRPO's log_prob on all reference cases (incl. the tiny-std last step)."""
    for case in baseline["flow"]:
        sigma, sigma_next = case["sigma"], case["sigma_next"]
        std_dev_t = case["noise_level"] * torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_next, sigma)))
        assert_within(std_dev_t, case["std_dev_t"], BASELINE_TOL)
        keys = ("model_output", "sample", "prev_sample", "sigma", "sigma_next", "std_dev_t")
        inputs = (case[k].to(DEVICE) for k in keys)
        log_prob, kl = sde_logprob(*inputs, backend=backend)
        assert kl is None
        assert_within(log_prob.cpu(), case["log_prob"], BASELINE_TOL)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ddim_logprob_reproduces_ddpo(baseline, backend):
    """ddim_logprob reproduces DDPO's log_prob (and its std) on all reference cases, eta 1 and 0.5."""
    for case in baseline["ddim"]:
        a_t, a_prev, eta = case["alpha_prod_t"], case["alpha_prod_t_prev"], case["eta"]
        std = eta * torch.sqrt(((1 - a_prev) / (1 - a_t)) * (1 - a_t / a_prev))
        assert_within(std, case["std_dev_t"], BASELINE_TOL)
        keys = ("model_output", "sample", "prev_sample", "alpha_prod_t", "alpha_prod_t_prev")
        inputs = (case[k].to(DEVICE) for k in keys)
        log_prob, _ = ddim_logprob(*inputs, eta, backend=backend)
        assert_within(log_prob.cpu(), case["log_prob"], BASELINE_TOL)


def test_ddim_gradient_and_kl_backends_agree(baseline):
    """On a real DDIM case with a reference eps, Triton and torch give the same kl and grad_eps (fp32)."""
    case = baseline["ddim"][2]
    eps, x, x_next = (case[k].to(DEVICE) for k in ("model_output", "sample", "prev_sample"))
    eps_ref = eps + 0.05 * torch.randn(eps.shape, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    results = []
    for backend in ("torch", "triton"):
        e = eps.clone().requires_grad_()
        a_t, a_prev = case["alpha_prod_t"].to(DEVICE), case["alpha_prod_t_prev"].to(DEVICE)
        log_prob, kl = ddim_logprob(e, x, x_next, a_t, a_prev, case["eta"], eps_ref=eps_ref, backend=backend)
        results.append((kl, *torch.autograd.grad(log_prob.sum() + 10 * kl.sum(), e)))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=FWD_RTOL, atol=FWD_ATOL)
    scale = results[0][1].abs().max().item()
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=GRAD_ATOL_SCALE * scale)


# ---- group advantages -------------------------------------------------------------------------------

def random_groups(seed):
    """Rewards and unsorted, non-contiguous ids: singletons, constant groups, one group larger than a block."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [1, 1, 2, 3, 7, 8, 16, 24, 24, 300]
    ids = torch.cat([torch.full((n,), 1000 * g - 37, dtype=torch.int64) for g, n in enumerate(sizes)])
    rewards = torch.randn(ids.numel(), generator=gen)
    rewards[ids == 1000 * 4 - 37] = 0.7  # constant, 7 members: a rounded mean leaves std ~6e-8
    rewards[ids == 1000 * 7 - 37] = 22.37  # constant, 24 members
    perm = torch.randperm(ids.numel(), generator=gen)
    return rewards[perm].to(DEVICE), ids[perm].to(DEVICE)


def brute_force_advantages(rewards, ids, eps, clip, global_std):
    """Plain Python, float64, one group at a time: (adv, the tolerance an fp32 computation of it needs)."""
    r, ids = rewards.double().tolist(), ids.tolist()
    all_std = math.sqrt(sum((a - sum(r) / len(r)) ** 2 for a in r) / len(r))
    out, tol = [], []
    for i, ri in enumerate(r):
        members = [r[j] for j in range(len(r)) if ids[j] == ids[i]]
        mean = sum(members) / len(members)
        std = all_std if global_std else math.sqrt(sum((a - mean) ** 2 for a in members) / len(members))
        constant = len(set(members)) == 1  # exactly 0, under a global std too
        out.append(0.0 if constant else max(-clip, min(clip, (ri - mean) / (std + eps))))
        tol.append(adv_tolerance(max(map(abs, r)), std, eps))
    return torch.tensor(out, dtype=torch.float64), torch.tensor(tol, dtype=torch.float64)


@pytest.mark.parametrize("global_std", [False, True])
def test_group_advantages_reference_matches_brute_force(global_std):
    """The vectorised reference equals a per-group Python loop in float64 (population std, eps, clip)."""
    rewards, ids = random_groups(5)
    adv = group_advantages_torch(rewards, ids, global_std=global_std).cpu()
    assert adv.dtype == torch.float32
    expected, tol = brute_force_advantages(rewards.cpu(), ids.cpu(), 1e-4, 5.0, global_std)
    assert torch.all((adv.double() - expected).abs() <= tol)


@pytest.mark.parametrize("global_std", [False, True])
def test_group_advantages_triton_matches_reference(global_std):
    """Triton advantages equal the reference on random ids and sizes (singletons, constant groups, 300 members)."""
    for seed in range(3):
        rewards, ids = random_groups(seed)
        adv = group_advantages(rewards, ids, global_std=global_std, backend="triton")
        diff = (adv - group_advantages_torch(rewards, ids, global_std=global_std)).abs().cpu()
        assert torch.all(diff <= brute_force_advantages(rewards.cpu(), ids.cpu(), 1e-4, 5.0, global_std)[1])


@pytest.mark.parametrize("global_std", [False, True])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_group_advantages_zero_variance_is_exactly_zero(backend, global_std):
    """Singleton and constant groups (even ones whose rounded fp32 mean is inexact) give exactly 0, never NaN, also
    under a global std, where their fp32 round-off over the batch's std would be |adv| ~1e-5."""
    rewards, ids = random_groups(6)
    adv = group_advantages(rewards, ids, global_std=global_std, backend=backend)
    constant = torch.isin(ids, torch.tensor([-37, 963, 3963, 6963], device=ids.device))
    assert torch.all(adv[constant] == 0) and not torch.isnan(adv).any()
    same = torch.full((6,), 22.37, device=DEVICE)
    assert torch.all(group_advantages(same, torch.zeros(6, dtype=torch.int64, device=DEVICE), global_std=True,
                                      backend=backend) == 0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_group_advantages_clip(backend):
    """One outlier among 40 rewards has adv 0.975 / sqrt(0.025 * 0.975) = 6.24 unclipped; clip=5 caps it at 5."""
    rewards = torch.zeros(40, device=DEVICE)
    rewards[0] = 1.0
    ids = torch.zeros(40, dtype=torch.int64, device=DEVICE)
    unclipped = group_advantages(rewards, ids, clip=100.0, backend=backend)
    assert abs(unclipped[0].item() - 0.975 / (math.sqrt(0.025 * 0.975) + 1e-4)) < 1e-5
    assert group_advantages(rewards, ids, backend=backend)[0] == 5.0
    assert group_advantages(-rewards, ids, backend=backend)[0] == -5.0


# ---- backend dispatch ---------------------------------------------------------------------------------

def run_python(*args, **env):
    """Run `python *args` in a fresh interpreter at the repo root with only the given kernel env vars set."""
    base = {k: v for k, v in os.environ.items() if k not in ("PROGRPO_KERNELS", "TRITON_INTERPRET")}
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env={**base, **env},
                          capture_output=True, text=True, timeout=120)


CALL = ("import torch, progrpo_kernels\n"
        "v = torch.randn(2, 3, 4, requires_grad=True)\n"
        "log_prob, _ = progrpo_kernels.sde_logprob(v, v.detach(), v.detach(), torch.tensor([.5, .4]), "
        "torch.tensor([.4, .3]), torch.tensor([.6, .7]){backend})\n"
        "graph, seen = [log_prob.grad_fn], []\n"  # every autograd node the log-prob depends on
        "while graph:\n"
        "    node = graph.pop()\n"
        "    seen.append(type(node).__name__)\n"
        "    graph += [n for n, _ in node.next_functions if n is not None]\n"
        "print('fused' if 'GaussianStepSumsBackward' in seen else 'unfused')\n")


def test_env_torch_selects_torch_and_env_triton_selects_triton():
    """PROGRPO_KERNELS=torch runs the torch graph even for CUDA; =triton (interpreter) runs the Triton Function."""
    out = run_python("-c", CALL.format(backend="") + "print(progrpo_kernels.resolve_backend('cuda'))",
                     PROGRPO_KERNELS="torch", TRITON_INTERPRET="1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["unfused", "torch"]
    out = run_python("-c", CALL.format(backend=""), PROGRPO_KERNELS="triton", TRITON_INTERPRET="1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["fused"]


def test_impossible_triton_request_raises():
    """Triton asked for on CPU tensors without the interpreter raises RuntimeError, by env and by argument."""
    out = run_python("-c", CALL.format(backend=""), PROGRPO_KERNELS="triton")
    assert out.returncode != 0 and "RuntimeError: Triton backend requested for tensors on cpu" in out.stderr
    out = run_python("-c", CALL.format(backend=", backend='triton'"))
    assert out.returncode != 0 and "RuntimeError" in out.stderr
    out = run_python("-c", "import torch, progrpo_kernels\n"
                     "progrpo_kernels.group_advantages(torch.rand(4), torch.zeros(4, dtype=torch.long), "
                     "backend='triton')")
    assert out.returncode != 0 and "RuntimeError" in out.stderr


def test_invalid_env_value_raises_at_first_call_with_allowed_values():
    """PROGRPO_KERNELS=gpu: the first op call raises a ValueError naming auto, triton, torch (import still works)."""
    out = run_python("-c", CALL.format(backend=""), PROGRPO_KERNELS="gpu")
    assert out.returncode != 0 and "ValueError: PROGRPO_KERNELS='gpu' is not valid" in out.stderr
    assert "auto, triton, torch" in out.stderr
    with pytest.raises(ValueError, match="auto, triton, torch"):
        progrpo_kernels.resolve_backend("cpu", backend="cuda")


def test_import_never_raises_and_stays_cheap():
    """`import progrpo_kernels` neither raises (a bad PROGRPO_KERNELS waits for the first op) nor imports triton."""
    out = run_python("-c", "import sys, progrpo_kernels; print('triton' in sys.modules)", PROGRPO_KERNELS="gpu")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False"]


def test_import_without_triton_keeps_torch_path():
    """With triton unimportable, progrpo_kernels imports, auto uses torch, and an explicit Triton request raises."""
    code = ("import sys; sys.modules['triton'] = None\n" + CALL.format(backend="")
            + "print(progrpo_kernels.triton_available(), progrpo_kernels.resolve_backend('cuda'))\n"
            + "progrpo_kernels.sde_logprob(v, v, v, .5, .4, .6, backend='triton')")
    out = run_python("-c", code, TRITON_INTERPRET="1")
    assert out.stdout.split()[1:] == ["False", "torch"], out.stderr
    assert out.returncode != 0 and "RuntimeError: Triton backend requested but triton is not importable" in out.stderr


# ---- benchmark smoke run --------------------------------------------------------------------------------

def test_bench_quick_runs():
    """`python -m progrpo_kernels.bench --quick` exits 0 and prints the table rows for the torch and eager paths."""
    out = run_python("-m", "progrpo_kernels.bench", "--quick")
    assert out.returncode == 0, out.stderr
    assert " eager " in out.stdout and " torch " in out.stdout


# ---- compiled for real GPUs (no GPU needed) -------------------------------------------------------------

def test_kernels_compile_for_sm80_and_sm90(tmp_path):
    """Every launch configuration of every Triton kernel builds to PTX and a cubin for sm_80 and sm_90.

    The interpreter the other tests use accepts code the compiler rejects, so this runs
    `python -m progrpo_kernels.compile_check` in a fresh process without TRITON_INTERPRET, with a cold cache.
    """
    from progrpo_kernels import _advantages_triton, _gaussian_step_triton

    expected = 2 * sum(len(list(m.compile_configs())) for m in (_gaussian_step_triton, _advantages_triton))
    out = run_python("-m", "progrpo_kernels.compile_check", "--cc", "80", "90", TRITON_CACHE_DIR=str(tmp_path),
                     TRITON_DEFAULT_FP_FUSION="1")  # the JIT's default, stated to silence triton 3.9's warning
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{expected}/{expected} kernel configurations compiled for sm_80, sm_90" in out.stdout
    for kernel in ("_gaussian_step_fwd_kernel", "_gaussian_step_bwd_kernel", "_group_stats_kernel",
                   "_normalize_kernel"):
        for cc in (80, 90):
            assert f"ok   sm_{cc} {kernel} " in out.stdout
    assert list(tmp_path.rglob("*.cubin")), "no cubin in the cache: the compiler did not run"


def test_compile_table_is_the_launch_table():
    """The compile table covers bf16/fp16/fp32 with and without v_ref; the launcher maps any input dtypes into it."""
    from progrpo_kernels import _gaussian_step_triton as g

    fwd = [(sig["v_ptr"], sig["x_ptr"], meta["HAS_REF"]) for k, sig, meta, _ in g.compile_configs()
           if k is g._gaussian_step_fwd_kernel]
    for v_type in ("*fp32", "*bf16", "*fp16"):
        for has_ref in (False, True):
            assert (v_type, v_type, has_ref) in fwd and (v_type, "*fp32", has_ref) in fwd
    launched = {g.launch_dtypes(a, b) for a in g.DTYPES for b in g.DTYPES}  # every input pair -> a compiled one
    expected = {("*fp32", "*fp32"), ("*bf16", "*bf16"), ("*bf16", "*fp32"), ("*fp16", "*fp16"), ("*fp16", "*fp32")}
    assert {("*" + g.DTYPES[v], "*" + g.DTYPES[x]) for v, x in launched} == expected == {(v, x) for v, x, _ in fwd}
    with pytest.raises(ValueError, match="use backend='torch'"):
        g.launch_dtypes(torch.float64, torch.float32)


# ---- first-use self-check ---------------------------------------------------------------------------------

@pytest.fixture
def fresh_process(monkeypatch):
    """As in a new process: no op has passed its self-check yet (restored after the test)."""
    monkeypatch.setattr(progrpo_kernels, "_self_checked", set())


def step_inputs(dtype=torch.float32):
    gen = torch.Generator().manual_seed(11)
    v, x, z, v_ref = (torch.randn(3, 5, 7, 9, generator=gen).to(DEVICE, dtype) for _ in range(4))
    return v.requires_grad_(), x, (x.float() + 0.3 * z.float()).to(dtype), v_ref, flow_schedule(3, gen)


def test_self_check_runs_once_per_op_and_passes_on_the_real_kernels(fresh_process, monkeypatch):
    """The first Triton call of each op evaluates the torch reference once; later calls trust the kernel."""
    calls = []
    for module, name in ((gaussian_step, "gaussian_step_logprob_torch"), (advantages, "group_advantages_torch")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    v, x, x_next, v_ref, sched = step_inputs(torch.bfloat16)
    for _ in range(3):
        log_prob, kl = sde_logprob(v, x, x_next, *sched, v_ref=v_ref, backend="triton")
        (log_prob.sum() + kl.sum()).backward()
    rewards, ids = random_groups(12)
    for _ in range(3):
        group_advantages(rewards, ids, backend="triton")
    assert calls == ["gaussian_step_logprob_torch", "group_advantages_torch"]
    assert not any(map(progrpo_kernels.self_check_pending, ("gaussian_step", "group_advantages")))


def test_self_check_raises_on_a_wrong_forward_gradient_or_advantage(fresh_process, monkeypatch):
    """A kernel result off by 0.1% (forward sum, gradient or advantage) raises, naming op, dtype, error, tolerance."""
    from progrpo_kernels import _advantages_triton, _gaussian_step_triton

    v, x, x_next, v_ref, sched = step_inputs()
    fused = _gaussian_step_triton.GaussianStepSums
    real_apply, real_backward = fused.apply, fused.backward
    monkeypatch.setattr(fused, "apply", lambda *a: tuple(1.001 * t for t in real_apply(*a)))
    message = (r"Triton gaussian_step \(torch.float32\) log_prob differs from the torch reference: "
               r"\|triton - torch\| = [0-9.e-]+ where the tolerance is [0-9.e-]+ \(largest difference [0-9.e-]+\)")
    with pytest.raises(RuntimeError, match=message):
        sde_logprob(v, x, x_next, *sched, v_ref=v_ref, backend="triton")
    assert progrpo_kernels.self_check_pending("gaussian_step")  # a failed op is not trusted: the next call checks again
    monkeypatch.setattr(fused, "apply", real_apply)
    monkeypatch.setattr(fused, "backward", staticmethod(lambda ctx, *g: (1.001 * real_backward(ctx, *g)[0],)
                                                         + (None,) * 5))
    with pytest.raises(RuntimeError, match=r"gaussian_step \(torch.float32\) grad_v differs"):
        sde_logprob(v, x, x_next, *sched, v_ref=v_ref, backend="triton")
    real_adv = _advantages_triton.group_advantages_triton
    monkeypatch.setattr(_advantages_triton, "group_advantages_triton", lambda *a: real_adv(*a) * 1.001)
    rewards, ids = random_groups(13)
    with pytest.raises(RuntimeError, match=r"group_advantages \(torch.float32\) adv differs"):
        group_advantages(rewards, ids, backend="triton")
