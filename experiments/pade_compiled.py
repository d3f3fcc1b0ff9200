"""The Pade root compiled by torch.compile (inductor) against the eager root and eigh, side by side.

Forward + backward, 64 x 48x48 fp32, the benchmark's matrices and a dense upstream gradient (as
benchmark.py), median of round-robin calls after the compilation. Two ways: `pade_sqrtm` itself
(dynamo traces the hand-written backward of its autograd.Function), and its forward and backward
functions compiled as two separate graphs inside an autograd.Function. What it shows: how much
of the root's time is elementwise work and operator dispatch that fusion removes
(docs/benchmark.md, "A fourth look"), and why the compiled root is not what the model uses.

    python experiments/pade_compiled.py
    python experiments/pade_compiled.py --mode max-autotune-no-cudagraphs
    python experiments/pade_compiled.py --cpp-wrapper
"""
import argparse
import os
import sys
import time
from functools import partial

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmark import measure, retain_freed_memory, root_benchmark_matrices  # noqa: E402
from models.ftf import _pade_forward, _PadeSqrtm, eigh_sqrtm, pade_sqrtm  # noqa: E402


def compiled_in_parts(**options):
    """pade_sqrtm with its forward and its backward compiled as two graphs."""
    forward, backward = torch.compile(_pade_forward, **options), torch.compile(_PadeSqrtm._backward, **options)

    class CompiledParts(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            root, saved = forward(a)
            ctx.save_for_backward(*saved)
            return root

        @staticmethod
        def backward(ctx, grad_root):
            return backward(grad_root, *ctx.saved_tensors)
    return CompiledParts.apply


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--mode', default=None, help="torch.compile mode (default: inductor's default)")
    parser.add_argument('--cpp-wrapper', action='store_true', help='inductor calls its kernels from C++, not Python')
    parser.add_argument('--repeats', type=int, default=200)
    args = parser.parse_args()
    retain_freed_memory()
    if args.cpp_wrapper:
        import torch._inductor.config as inductor_config
        inductor_config.cpp_wrapper = True
    a = root_benchmark_matrices(torch.device('cpu')).requires_grad_(True)
    upstream = torch.randn(a.shape)
    options = dict(fullgraph=True, dynamic=False, mode=args.mode)
    compiled, parts = torch.compile(pade_sqrtm, **options), compiled_in_parts(**options)

    def gradient(fn):
        torch.autograd.backward(fn(a), upstream)
        grad, a.grad = a.grad, None
        return grad

    start = time.perf_counter()
    compiled_grad = gradient(compiled)  # compiles forward and backward (or loads them from inductor's cache)
    compile_seconds = time.perf_counter() - start
    gradient(parts)
    eager_grad = gradient(pade_sqrtm)
    with torch.no_grad():
        value_difference = float((compiled(a) - pade_sqrtm(a)).norm() / pade_sqrtm(a).norm())
    roots = {'eager': pade_sqrtm, 'compiled': compiled, 'parts': parts, 'eigh': eigh_sqrtm}
    seconds = measure({name: partial(gradient, root) for name, root in roots.items()}, torch.device('cpu'),
                      warmup=5, repeats=args.repeats)
    gradient_difference = float((compiled_grad - eager_grad).norm() / eager_grad.norm())
    print(f'first call of the whole (compilation) {compile_seconds:.1f} s; compiled against eager: '
          f'value {value_difference:.1e}, gradient {gradient_difference:.1e} (relative)')
    for name, s in seconds.items():
        print(f'{name:9s} fwd+bwd {s * 1e3:6.2f} ms   eigh / {name}: {seconds["eigh"] / s:.2f}x')
    return 0


if __name__ == '__main__':
    sys.exit(main())
