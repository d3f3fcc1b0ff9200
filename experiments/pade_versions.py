"""The Pade root of a git revision against the current one and eigh, side by side in one process.

Forward + backward and forward alone (64 x 48x48 fp32, the benchmark's matrices), the LU solve
the first version used against spd_inverse, and minor page faults per call. docs/benchmark.md
quotes its output. The backward pass gets `.sum()`'s expanded gradient of ones, as benchmark.py
sent before commit 8b586de (it now sends a dense one, which makes eigh faster: see docs/benchmark.md), so
that the quoted numbers can be measured again.

    python experiments/pade_versions.py d68bd90            # the first version of models/ftf.py
    python experiments/pade_versions.py d68bd90 --fresh-allocator
"""
import argparse
import importlib.util
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmark import retain_freed_memory, root_benchmark_matrices  # noqa: E402
from models import ftf  # noqa: E402


def load_revision(revision: str):
    """models/ftf.py as it was at `revision`, imported as a separate module."""
    source = subprocess.run(['git', 'show', f'{revision}:models/ftf.py'], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    with tempfile.NamedTemporaryFile('w', suffix='.py', delete=False) as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(f'ftf_{revision}', f.name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    os.unlink(f.name)
    return module


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('revision', help='git revision whose models/ftf.py is compared')
    parser.add_argument('--repeats', type=int, default=200)
    parser.add_argument('--fresh-allocator', action='store_true', help="keep glibc's start-up memory thresholds")
    args = parser.parse_args()
    if not args.fresh_allocator:
        retain_freed_memory()
    old = load_revision(args.revision)
    a = root_benchmark_matrices(torch.device('cpu')).requires_grad_(True)
    matrices = a.detach()

    def forward_backward(fn):
        return lambda: fn(a).sum().backward()
    cases = {
        f'{args.revision} fwd+bwd': forward_backward(old.pade_sqrtm),
        'current fwd+bwd': forward_backward(ftf.pade_sqrtm),
        'eigh fwd+bwd': forward_backward(ftf.eigh_sqrtm),
        f'{args.revision} fwd': lambda: old.pade_sqrtm(matrices),
        'current fwd': lambda: ftf.pade_sqrtm(matrices),
        'eigh fwd': lambda: ftf.eigh_sqrtm(matrices),
        'LU solve 48': lambda: torch.linalg.solve(matrices, matrices),
        'spd_inverse 48': lambda: ftf.spd_inverse(matrices),
    }
    for fn in cases.values():
        for _ in range(5):
            fn()
    times = {name: [] for name in cases}
    faults = {name: 0 for name in cases}
    for _ in range(args.repeats):  # round-robin, as benchmark.py
        for name, fn in cases.items():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
            faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    for name in cases:
        print(f'{name:24s} {statistics.median(times[name]) * 1e3:7.2f} ms  {faults[name] / args.repeats:7.1f} faults/call')
    return 0


if __name__ == '__main__':
    sys.exit(main())
