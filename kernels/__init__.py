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

Why `import kernels` does nothing but define functions: transformers 5, while being imported, probes
for the Hugging Face hub package that is also called `kernels` (is_kernels_available) and, finding no
metadata, imports whatever top-level `kernels` is on sys.path: this package, when run from the repo
root. So importing it must never raise and must stay cheap: PROGRPO_KERNELS is validated at the first
op call, triton is imported the first time a Triton kernel runs, and there is deliberately no
`__version__` (transformers would take this package for the hub one).
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
    "settings",
    "triton_available",
]
