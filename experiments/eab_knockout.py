"""What a trained EAB carries: a copy of a checkpoint with every EAB's last convolution at zero, so
that each EAB is the identity again (as at the start of fine-tuning) and nothing else changes.
Evaluating the copy beside the original (main.py --eval) gives the accuracy the EABs add; the
size of their last convolutions says how far fine-tuning moved them from zero.

    python -m experiments.eab_knockout CHECKPOINT OUT_CHECKPOINT
"""
import re
import sys
from typing import Dict

import torch

from utils import ArgumentParser, UserError, atomic_torch_save, error_boundary
from workflow.runs import load_checkpoint, model_state

# the last (zero-started) 1x1 convolution of each shift-conv module: blocks.<i>.eab.<scm>.reduce.*
EAB_LAST_CONV = re.compile(r'^(?:module\.)?blocks\.(\d+)\.eab\.\w+\.reduce\.(weight|bias)$')


def eab_last_conv_rms(weights: Dict[str, torch.Tensor]) -> Dict[int, float]:
    """Per block, the root mean square of its EAB's last convolution weights (0 at the start)."""
    squares: Dict[int, list] = {}
    for name, tensor in weights.items():
        match = EAB_LAST_CONV.match(name)
        if match and match.group(2) == 'weight':
            squares.setdefault(int(match.group(1)), []).append(tensor.float().pow(2).flatten())
    return {block: torch.cat(parts).mean().sqrt().item() for block, parts in sorted(squares.items())}


def knocked_out(checkpoint: Dict, path: str) -> Dict:
    """The checkpoint with the EABs' last convolutions (weights and biases) at zero."""
    weights = dict(checkpoint['model'])
    names = [name for name in weights if EAB_LAST_CONV.match(name)]
    if not names:
        raise UserError(f'{path} has no EAB (a model trained with --no-eab?)')
    for name in names:
        weights[name] = torch.zeros_like(weights[name])
    return {**checkpoint, 'model': weights}


@error_boundary
def main(argv=None) -> int:
    parser = ArgumentParser(prog='eab_knockout.py', description=__doc__.splitlines()[0])
    parser.add_argument('checkpoint', help='a trained SDT2Net checkpoint with EAB')
    parser.add_argument('out', help='where the copy goes (must differ from the checkpoint)')
    args = parser.parse_args(argv)
    if args.out == args.checkpoint:
        raise UserError('the copy would overwrite the checkpoint: give another path')
    checkpoint = load_checkpoint(args.checkpoint)
    rms = eab_last_conv_rms(model_state(checkpoint, args.checkpoint))
    atomic_torch_save(knocked_out(checkpoint, args.checkpoint), args.out)
    print('EAB last-convolution RMS per block: ' + ', '.join(f'{b}: {v:.2e}' for b, v in rms.items()))
    return 0


if __name__ == '__main__':
    sys.exit(main())
