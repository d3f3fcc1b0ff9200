"""Whether the model runs as exported graphs need it: the operations an ONNX graph cannot hold have
stand-ins, chosen while torch.export / torch.onnx trace the model: a TopK instead of the stable sort
(the same order: ONNX's TopK breaks ties by the lower index; eager topk does not, so eager code
keeps the sort), and, also in eager mode inside `export_numerics()` (to compare a runtime with the
computation it was given), Newton-Schulz products instead of the Cholesky inverse of the Pade root
and [B, 4, N, N] matrix products instead of the `embedding_bag` sums of the EAB's shifts."""
import contextlib
from typing import Iterator

import torch

_forced = False


def tracing() -> bool:
    """True while torch.export / torch.onnx trace the model."""
    return torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()


def exporting() -> bool:
    """True while tracing for export, or inside export_numerics()."""
    return _forced or tracing()


@contextlib.contextmanager
def export_numerics() -> Iterator[None]:
    """Run eager code with the exported graph's operations."""
    global _forced
    previous, _forced = _forced, True
    try:
        yield
    finally:
        _forced = previous
