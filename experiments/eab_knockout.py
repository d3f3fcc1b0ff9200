"""What a trained EAB carries: a copy of a checkpoint with every EAB's last convolution at zero, so
that each EAB is the identity again (as at the start of fine-tuning) and nothing else changes.
Evaluating the copy beside the original (main.py --eval) gives the accuracy the EABs add; the
size of their last convolutions says how far fine-tuning moved them from zero.

    python -m experiments.eab_knockout CHECKPOINT OUT_CHECKPOINT
"""
import sys

from models.checkpoint import eab_last_conv_rms, without_eab
from utils import ArgumentParser, UserError, atomic_torch_save, error_boundary
from workflow.runs import load_checkpoint, model_state


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
    try:
        copy = {**checkpoint, 'model': without_eab(checkpoint['model'])}
    except ValueError as error:
        raise UserError(f'{args.checkpoint}: {error}') from None
    atomic_torch_save(copy, args.out)
    print('EAB last-convolution RMS per block: ' + ', '.join(f'{b}: {v:.2e}' for b, v in rms.items()))
    return 0


if __name__ == '__main__':
    sys.exit(main())
