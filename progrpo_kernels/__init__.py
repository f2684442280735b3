"""Fused kernels for Pro-GRPO: Triton kernels, their torch references, and the backend switch.

Ops (one public module each; every op has an `<op>_torch` reference that is the spec the tests pin,
and a private `_<op>_triton.py` holding its @triton.jit kernels):

- `sde_logprob`, `ddim_logprob` (gaussian_step.py): per-sample Gaussian log-prob of a stored sampler
  step, and optionally the KL term against a reference model output, differentiable in the model
  output, in one pass over the latents.
- `group_advantages` (advantages.py): GRPO advantages normalised within arbitrary groups.

Backend choice, read ONCE from the environment (at the first op call, see below):

    PROGRPO_KERNELS=auto     (default) Triton when triton imports and the tensors are on CUDA, else torch
    PROGRPO_KERNELS=triton   always Triton; a call that cannot run it raises RuntimeError
    PROGRPO_KERNELS=torch    always the torch reference

Each op's `backend=` argument ("triton", "torch", or None for the setting above) overrides per call
with the same rules. An explicit Triton request is never silently downgraded: without triton, or with
CPU tensors while TRITON_INTERPRET is not "1" (Triton's CPU interpreter, used by the tests), it raises.

Why the name: the user's layout calls this folder kernels/, but Hugging Face's `kernels` distribution (a
dependency of transformers >= 5.25) has that top-level name, and a folder of ours called kernels/ shadowed it
whenever the repository root was on sys.path. Importing this package stays cheap and never raises:
PROGRPO_KERNELS is validated at the first op call and triton is imported the first time a Triton kernel runs.

First-use self-check. The interpreter the CPU tests run accepts code the compiler rejects, and a
compiled kernel can still be wrong on hardware no test has run on. So the first Triton call of each op
in a process (on any device, the interpreter included) also evaluates the op's fp32 torch reference on
the same inputs and compares forward and gradient with the tolerances the tests use; a mismatch raises
RuntimeError naming the op, the dtype, the largest difference and the tolerance. After one pass the op
is trusted for the rest of the process. Cost, once per op: one torch evaluation of the reference (for
the log-prob a forward+backward, plus one more fused forward+backward on a copy of v).
"""

import functools
import os

import torch

ALLOWED_SETTINGS = ("auto", "triton", "torch")


@functools.cache
def settings() -> tuple[str, bool]:
    """(PROGRPO_KERNELS, TRITON_INTERPRET == "1"), read from the environment once, at first use."""
    setting = os.environ.get("PROGRPO_KERNELS", "auto").strip().lower()
    if setting not in ALLOWED_SETTINGS:
        raise ValueError(f"PROGRPO_KERNELS={os.environ['PROGRPO_KERNELS']!r} is not valid; "
                         f"use one of {', '.join(ALLOWED_SETTINGS)}")
    return setting, os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def triton_available() -> bool:
    """Whether triton imports (imported here, on the first call that could use it)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(device, backend=None) -> str:
    """Return "triton" or "torch": the backend an op on tensors of `device` runs with.

    `backend` is the per-call override ("triton", "torch", or None for PROGRPO_KERNELS).
    Raises ValueError for an invalid setting, RuntimeError when Triton is requested explicitly but
    cannot run on `device`.
    """
    setting, interpret = settings()
    choice = setting if backend is None else backend
    if choice not in ALLOWED_SETTINGS:
        raise ValueError(f"backend={backend!r} is not valid; use one of {', '.join(ALLOWED_SETTINGS)} or None")
    is_cuda = torch.device(device).type == "cuda"
    if choice == "torch" or (choice == "auto" and not is_cuda):  # auto never picks the slow CPU interpreter
        return "torch"
    if choice == "auto":
        return "triton" if triton_available() else "torch"
    if not triton_available():
        raise RuntimeError("Triton backend requested but triton is not importable; "
                           "install triton or set PROGRPO_KERNELS=torch")
    if not is_cuda and not interpret:
        raise RuntimeError(f"Triton backend requested for tensors on {device}; Triton needs CUDA tensors "
                           "(or TRITON_INTERPRET=1, set before triton is imported, for the slow CPU interpreter). "
                           "Move the tensors to CUDA or set PROGRPO_KERNELS=torch")
    return "triton"


_self_checked = set()  # ops whose first Triton result in this process matched the torch reference


def self_check_pending(op) -> bool:
    """Whether `op` still has to be compared with its torch reference in this process."""
    return op not in _self_checked


def verify_against_reference(op, dtype, checks):
    """Raise RuntimeError unless every (name, triton, reference, rtol, atol) agrees; then trust `op`.

    Agreement is elementwise |triton - reference| <= atol + rtol |reference| (atol may be a tensor), as
    in torch.testing.assert_close. A failed op stays untrusted, so every later call checks (and raises) again.
    """
    for name, fused, ref, rtol, atol in checks:
        diff = (fused.double() - ref.double()).abs()
        tol = atol + rtol * ref.double().abs()
        worst = torch.argmax(diff - tol)  # NaN in either side makes diff NaN, and argmax picks it
        if not diff.flatten()[worst] <= tol.flatten()[worst]:
            raise RuntimeError(
                f"kernels self-check: Triton {op} ({dtype}) {name} differs from the torch reference: "
                f"|triton - torch| = {diff.flatten()[worst].item():.3g} where the tolerance is "
                f"{tol.flatten()[worst].item():.3g} (largest difference {diff.max().item():.3g}); this Triton "
                "build is wrong on this device: set PROGRPO_KERNELS=torch and report it")
    _self_checked.add(op)


# The op modules import `resolve_backend` from this package, so they come after it.
from .advantages import group_advantages, group_advantages_torch  # noqa: E402
from .gaussian_step import ddim_logprob, gaussian_step_logprob_torch, sde_logprob  # noqa: E402

__all__ = [
    "ddim_logprob",
    "gaussian_step_logprob_torch",
    "group_advantages",
    "group_advantages_torch",
    "resolve_backend",
    "sde_logprob",
    "self_check_pending",
    "settings",
    "triton_available",
    "verify_against_reference",
]
