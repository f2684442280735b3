"""Triton half of gaussian_step.py: the fused residual sums, their autograd.Function, and the launch table.

What runs here is only the (B, D) pass. Per sample b the kernels compute, in fp32,

    sq_sum[b]  = sum_D (x_next - cx x - cv v)^2          ref_sq_sum[b] = sum_D (v - v_ref)^2

and their gradients in v; gaussian_step.py turns the two (B,) sums into log_prob and kl with torch
scalar ops, so the Gaussian constants live in one module and this one imports nothing from the package.

Launch design: one program per (sample, block of BLOCK_D elements), fixed BLOCK_D and num_warps, no
autotune. Each program accumulates its block in fp32 (inputs of any float dtype are upcast after the
load) and writes its partial sums; torch adds the (B, D / BLOCK_D) partials. Two stages instead of
atomics keep the result deterministic, and a grid over blocks (not one program per sample) keeps the
GPU busy at B = 12.

Launch table: the kernels are launched only with the (v, x) dtype pairs `launch_dtypes` returns (v and
v_ref share one dtype, x and x_next another: one precision throughout, or a low-precision model output
with fp32 latents, as progrpo's update has) and the constexprs of `constexprs(has_ref)` for has_ref in
HAS_REF_VALUES; other inputs are upcast to such a pair first. `compile_configs()` enumerates exactly
that table; the compile test (progrpo_kernels/test_kernels.py) builds every entry for sm_80 and sm_90.
"""

import itertools

import torch
import triton
import triton.language as tl

BLOCK_D = 1024  # elements per program; D = C*H*W is 65,536 (sd35) or 16,384 (sd14) per sample
NUM_WARPS = 4
DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}  # torch dtype: Triton type
HAS_REF_VALUES = (False, True)


def launch_dtypes(v_dtype, x_dtype):
    """(v dtype, x dtype) the kernels run with for inputs of these dtypes: x is upcast to fp32 unless it is v's."""
    for dtype in (v_dtype, x_dtype):
        if dtype not in DTYPES:
            raise ValueError(f"the Triton log-prob kernels take {', '.join(map(str, DTYPES))} inputs, got {dtype}; "
                             "use backend='torch'")
    return v_dtype, (x_dtype if x_dtype == v_dtype else torch.float32)


def constexprs(has_ref):
    """The constexpr arguments both kernels are launched with."""
    return {"HAS_REF": has_ref, "BLOCK_D": BLOCK_D}


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
def _gaussian_step_fwd_kernel(v_ptr, x_ptr, x_next_ptr, v_ref_ptr, cx_ptr, cv_ptr, sq_ptr, ref_sq_ptr,
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
        tl.store(ref_sq_ptr + b * NUM_BLOCKS + blk, tl.sum(dv * dv, axis=0))


@triton.jit
def _gaussian_step_bwd_kernel(v_ptr, x_ptr, x_next_ptr, v_ref_ptr, cx_ptr, cv_ptr, a_ptr, c_ptr, grad_ptr,
                              D, HAS_REF: tl.constexpr, BLOCK_D: tl.constexpr):
    # grad_v = a[b] (x_next - mean) + c[b] (v - v_ref); a = -2 cv g_sq_sum, c = 2 g_ref_sq_sum
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


def compile_configs():
    """Every (kernel, signature, constexprs, num_warps) the launch code below can produce.

    The signature is built from each kernel's own argument names, so an argument added to a kernel but
    not to this table fails the compile test with a KeyError instead of going uncompiled.
    """
    pairs = sorted({launch_dtypes(v, x) for v, x in itertools.product(DTYPES, DTYPES)}, key=str)
    for (v_dtype, x_dtype), has_ref in itertools.product(pairs, HAS_REF_VALUES):
        v_type, x_type = DTYPES[v_dtype], DTYPES[x_dtype]
        types = {"v_ptr": v_type, "v_ref_ptr": v_type, "x_ptr": x_type, "x_next_ptr": x_type,
                 "cx_ptr": "fp32", "cv_ptr": "fp32", "sq_ptr": "fp32", "ref_sq_ptr": "fp32",
                 "a_ptr": "fp32", "c_ptr": "fp32", "grad_ptr": v_type}
        meta = constexprs(has_ref)
        for kernel in (_gaussian_step_fwd_kernel, _gaussian_step_bwd_kernel):
            signature = {name: "constexpr" if name in meta else "i32" if name in ("D", "NUM_BLOCKS")
                         else "*" + types[name] for name in kernel.arg_names}
            yield kernel, signature, meta, NUM_WARPS


class GaussianStepSums(torch.autograd.Function):
    """(sq_sum, ref_sq_sum), fp32 (B,) each, differentiable in v. Saves only the (flattened) inputs."""

    @staticmethod
    def forward(ctx, v, x, x_next, v_ref, cx, cv):
        B = v.shape[0]
        has_ref = v_ref is not None
        v_dtype, x_dtype = launch_dtypes(torch.promote_types(v.dtype, v_ref.dtype if has_ref else v.dtype),
                                         torch.promote_types(x.dtype, x_next.dtype))
        v2 = v.reshape(B, -1).to(v_dtype).contiguous()  # views unless strided or upcast
        x2, x_next2 = (t.reshape(B, -1).to(x_dtype).contiguous() for t in (x, x_next))
        v_ref2 = v_ref.reshape(B, -1).to(v_dtype).contiguous() if has_ref else v2  # v2 is an unread placeholder
        D = v2.shape[1]
        num_blocks = triton.cdiv(D, BLOCK_D)
        partial = torch.zeros(2, B, num_blocks, dtype=torch.float32, device=v.device)  # fp32 block sums
        _gaussian_step_fwd_kernel[(B, num_blocks)](
            v2, x2, x_next2, v_ref2, cx, cv, partial[0], partial[1], D, num_blocks,
            **constexprs(has_ref), num_warps=NUM_WARPS)
        sq_sum, ref_sq_sum = partial.sum(2)  # (B,) each; ref_sq_sum is 0 without v_ref
        if not has_ref:
            ctx.mark_non_differentiable(ref_sq_sum)
        ctx.save_for_backward(v2, x2, x_next2, v_ref2, cx, cv)
        ctx.has_ref, ctx.v_shape, ctx.v_dtype = has_ref, v.shape, v.dtype
        return sq_sum, ref_sq_sum

    @staticmethod
    def backward(ctx, grad_sq_sum, grad_ref_sq_sum):
        if not ctx.needs_input_grad[0]:
            return (None,) * 6
        v2, x2, x_next2, v_ref2, cx, cv = ctx.saved_tensors
        B, D = v2.shape
        a = -2 * cv * grad_sq_sum.float()  # (B,) per-sample factors, fp32
        c = 2 * grad_ref_sq_sum.float() if ctx.has_ref else a
        grad_v = torch.empty_like(v2)  # in the launch dtype of v (v's own dtype unless it was upcast)
        _gaussian_step_bwd_kernel[(B, triton.cdiv(D, BLOCK_D))](
            v2, x2, x_next2, v_ref2, cx, cv, a, c, grad_v, D, **constexprs(ctx.has_ref), num_warps=NUM_WARPS)
        return grad_v.view(ctx.v_shape).to(ctx.v_dtype), None, None, None, None, None
