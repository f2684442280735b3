"""Compile every Triton kernel of progrpo_kernels/ for real CUDA targets, on a machine with or without a GPU.

    python -m progrpo_kernels.compile_check              # sm_80 (A100) and sm_90 (H100/H200)
    python -m progrpo_kernels.compile_check --cc 80 90 100

Why: without a GPU the tests run the kernels in Triton's CPU interpreter, which executes the Python
body and accepts code the compiler rejects (a dtype the lowering does not support, a constexpr branch
that only one configuration takes). This builds each launch configuration (every entry of each Triton
module's `compile_configs()`, the table its launch code draws from; a @triton.jit function named
*_kernel that the table misses is itself a failure) through the whole pipeline,
TTIR -> TTGIR -> LLVM IR -> PTX -> cubin, with the ptxas shipped in the triton wheel. No GPU or driver is
needed: the target is given explicitly. It cannot catch a wrong result, only code that does not build;
the first-use self-check (progrpo_kernels/__init__.py) catches wrong results on the device.

Must run without TRITON_INTERPRET=1 (the interpreter replaces the compiler); exits 1 on any failure,
naming the kernel and configuration, 2 on bad arguments.
"""

import argparse
import concurrent.futures
import os
import sys


def _modules():
    from . import _advantages_triton, _gaussian_step_triton

    return _gaussian_step_triton, _advantages_triton


def configs():
    """(kernel, signature, constexprs, num_warps) for every launch of every Triton kernel in progrpo_kernels/."""
    for module in _modules():
        yield from module.compile_configs()


def unlisted_kernels():
    """Names of @triton.jit functions named *_kernel (jit helpers are not) that no compile_configs() lists."""
    from triton.runtime.jit import KernelInterface

    listed = {id(kernel) for kernel, *_ in configs()}
    return [f"{module.__name__}.{name}" for module in _modules() for name, obj in vars(module).items()
            if isinstance(obj, KernelInterface) and name.endswith("_kernel") and id(obj) not in listed]


def _compile(jobs):
    """Compile the (capability, index into configs()) pairs in `jobs`; return [(description, error or None)]."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    table = list(configs())
    results = []
    for cc, index in jobs:
        kernel, signature, constexprs, num_warps = table[index]
        pointers = ",".join(t[1:] for t in signature.values() if t.startswith("*"))
        what = f"sm_{cc} {kernel.fn.__name__} {constexprs} {pointers}"
        try:
            compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                      target=GPUTarget("cuda", cc, 32), options={"num_warps": num_warps})
            error = None if compiled.asm.get("cubin") else "no cubin produced"
        except Exception as e:  # any failure of the pipeline is a finding, reported per configuration
            error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"
        results.append((what, error))
    return results


def compile_all(capabilities, workers=2):
    """Compile every configuration for every capability in `workers` processes; [(description, error or None)]."""
    jobs = [(cc, index) for cc in capabilities for index in range(len(list(configs())))]
    chunks = [jobs[w::workers] for w in range(workers)]
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        return [result for chunk in pool.map(_compile, chunks) for result in chunk]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cc", type=int, nargs="+", default=[80, 90],
                        help="CUDA compute capabilities to build for, e.g. 80 90 (default: 80 90)")
    parser.add_argument("--workers", type=int, default=2, help="compiler processes (default: 2)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("error: TRITON_INTERPRET=1 replaces the compiler with the interpreter; unset it and rerun",
              file=sys.stderr)
        sys.exit(2)
    results = compile_all(args.cc, args.workers)
    results += [(name, "launched by its module but missing from its compile_configs()") for name in unlisted_kernels()]
    for what, error in results:
        print(f"ok   {what}" if error is None else f"FAIL {what}: {error}")
    failed = sum(error is not None for _, error in results)
    targets = ", ".join(f"sm_{cc}" for cc in args.cc)
    print(f"{len(results) - failed}/{len(results)} kernel configurations compiled for {targets}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
