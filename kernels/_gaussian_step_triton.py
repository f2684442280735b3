"""Triton half of gaussian_step.py: the forward and backward kernels and their autograd.Function.

Launch design: one program per (sample, block of BLOCK_D elements), fixed BLOCK_D and num_warps, no
autotune. Each program accumulates its block in fp32 (inputs of any float dtype are upcast after the
load) and writes its partial sums; torch adds the (B, D / BLOCK_D) partials. Two stages instead of
atomics keep the result deterministic, and a grid over blocks (not one program per sample) keeps the
GPU busy at B = 12.
"""

import torch
import triton
import triton.language as tl

from .gaussian_step import HALF_LOG_2PI

BLOCK_D = 1024  # elements per program; D = C*H*W is 65,536 (sd35) or 16,384 (sd14) per sample
NUM_WARPS = 4


@triton.jit
def _load_residual(v_ptr, x_ptr, x_next_ptr, cx_ptr, cv_ptr, b, offs, mask):
    """Loads one block of sample b (cast to fp32) and returns (v, x_next - mean); masked lanes give 0."""
    cx = tl.load(cx_ptr + b)
    cv = tl.load(cv_ptr + b)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x_next = tl.load(x_next_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return v, x_next - (cx * x + cv * v)


@triton.jit
def _gaussian_step_fwd_kernel(v_ptr, x_ptr, x_next_ptr, v_ref_ptr, cx_ptr, cv_ptr, sq_ptr, kl_ptr,
                              D, NUM_BLOCKS, HAS_REF: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    blk = tl.program_id(1)
    cols = blk * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < D  # masked lanes load 0 everywhere, so they add 0 to both sums
    offs = b.to(tl.int64) * D + cols
    v, diff = _load_residual(v_ptr, x_ptr, x_next_ptr, cx_ptr, cv_ptr, b, offs, mask)
    tl.store(sq_ptr + b * NUM_BLOCKS + blk, tl.sum(diff * diff, axis=0))
    if HAS_REF:
        dv = v - tl.load(v_ref_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(kl_ptr + b * NUM_BLOCKS + blk, tl.sum(dv * dv, axis=0))


@triton.jit
def _gaussian_step_bwd_kernel(v_ptr, x_ptr, x_next_ptr, v_ref_ptr, cx_ptr, cv_ptr, a_ptr, c_ptr, grad_ptr,
                              D, HAS_REF: tl.constexpr, BLOCK_D: tl.constexpr):
    # grad_v = a[b] (x_next - mean) + c[b] (v - v_ref); a = g_logp cv / (s^2 D), c = g_kl 2 kl_scale / D
    b = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < D
    offs = b.to(tl.int64) * D + cols
    v, diff = _load_residual(v_ptr, x_ptr, x_next_ptr, cx_ptr, cv_ptr, b, offs, mask)
    grad = tl.load(a_ptr + b) * diff  # mean recomputed, never stored
    if HAS_REF:
        v_ref = tl.load(v_ref_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        grad += tl.load(c_ptr + b) * (v - v_ref)
    tl.store(grad_ptr + offs, grad.to(grad_ptr.dtype.element_ty), mask=mask)


class GaussianStepLogProb(torch.autograd.Function):
    """Triton forward/backward. Saves only the (flattened) inputs and per-sample scalars."""

    @staticmethod
    def forward(ctx, v, x, x_next, v_ref, cx, cv, s, kl_scale):
        B = v.shape[0]
        v2, x2, x_next2 = (t.reshape(B, -1).contiguous() for t in (v, x, x_next))  # views unless strided
        has_ref = v_ref is not None
        v_ref2 = v_ref.reshape(B, -1).contiguous() if has_ref else v2  # v2 is an unread placeholder
        D = v2.shape[1]
        num_blocks = triton.cdiv(D, BLOCK_D)
        partial = torch.zeros(2, B, num_blocks, dtype=torch.float32, device=v.device)  # fp32 block sums
        _gaussian_step_fwd_kernel[(B, num_blocks)](
            v2, x2, x_next2, v_ref2, cx, cv, partial[0], partial[1], D, num_blocks,
            HAS_REF=has_ref, BLOCK_D=BLOCK_D, num_warps=NUM_WARPS)
        sq_sum, ref_sq_sum = partial.sum(2)  # (B,) each
        log_prob = -sq_sum / (2 * s * s * D) - torch.log(s) - HALF_LOG_2PI
        kl = kl_scale * ref_sq_sum / D if has_ref else torch.zeros_like(log_prob)
        if not has_ref:
            ctx.mark_non_differentiable(kl)
        ctx.save_for_backward(v2, x2, x_next2, v_ref2, cx, cv, s, kl_scale)
        ctx.has_ref, ctx.v_shape = has_ref, v.shape
        return log_prob, kl

    @staticmethod
    def backward(ctx, grad_log_prob, grad_kl):
        if not ctx.needs_input_grad[0]:
            return (None,) * 8
        v2, x2, x_next2, v_ref2, cx, cv, s, kl_scale = ctx.saved_tensors
        B, D = v2.shape
        a = grad_log_prob.float() * cv / (s * s * D)  # (B,) per-sample factors, fp32
        c = grad_kl.float() * 2 * kl_scale / D if ctx.has_ref else a
        grad_v = torch.empty_like(v2)  # gradient dtype = v's dtype
        _gaussian_step_bwd_kernel[(B, triton.cdiv(D, BLOCK_D))](
            v2, x2, x_next2, v_ref2, cx, cv, a, c, grad_v, D,
            HAS_REF=ctx.has_ref, BLOCK_D=BLOCK_D, num_warps=NUM_WARPS)
        return grad_v.view(ctx.v_shape), None, None, None, None, None, None, None
