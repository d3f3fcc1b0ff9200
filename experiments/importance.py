"""Which ranking of the patches keeps the most accuracy when a fixed schedule removes tokens: the
class token's attention (DTC's), the attention each patch receives averaged over queries and heads
(the ranking of ViTs without a class token), or a random one (the floor), on the same trained
weights and images; each against the others as paired differences with 95% intervals.

    python -m experiments.importance CHECKPOINT --data-path DATA [--split val] [--target_flops G]
"""
import json
import sys
from typing import Dict

import torch

import models
from datasets import build_transform
from utils import ArgumentParser, UserError, atomic_write_text, error_boundary
from workflow.runs import load_trained_model
from workflow.stats import correct_on_split, difference_text, paired_differences


def random_ranking(model: models.SDT2Net, seed: int):
    """Forward hooks that replace every block's ranking by uniform noise (seeded); their handles."""
    generator = torch.Generator().manual_seed(seed)

    def hook(module, inputs, output):
        out, ranking = output
        return out, None if ranking is None else torch.rand(ranking.shape, generator=generator)
    return [block.attn.register_forward_hook(hook) for block in model.blocks]


@error_boundary
def main(argv=None) -> int:
    parser = ArgumentParser(prog='importance.py', description=__doc__.splitlines()[0])
    parser.add_argument('checkpoint', help='a trained checkpoint written by main.py')
    parser.add_argument('--data-path', required=True, help='ImageFolder root with the split below')
    parser.add_argument('--split', default='val')
    parser.add_argument('--target_flops', type=float, required=True,
                        help='GFLOPs of the same-fraction schedules (prune-only and merge-only) compared')
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--out', default='', help='also write the results here (JSON)')
    args = parser.parse_args(argv)
    model, run_args = load_trained_model(args.checkpoint)
    split, transform = f'{args.data_path}/{args.split}', build_transform(False, run_args)
    rankings = ['class', 'received', 'random'] if model.has_class_token else ['received', 'random']
    results: Dict[str, Dict] = {}
    for mode in ('prune', 'merge'):
        try:
            schedule = models.uniform_schedule(model.shape(), args.target_flops, mode, 'ratio')
        except ValueError as error:
            raise UserError(str(error)) from None
        model.fix_schedule(schedule)
        correct = {}
        for ranking in rankings:
            model.rank_by('received' if ranking == 'random' else ranking)
            hooks = random_ranking(model, seed=0) if ranking == 'random' else []
            paths, correct[ranking] = correct_on_split(model, split, model.class_names, transform, args.batch_size)
            for handle in hooks:
                handle.remove()
        pairs = [(a, b) for i, a in enumerate(rankings) for b in rankings[i + 1:]]
        differences = paired_differences(correct, pairs)
        row = {'gflops': schedule.flops(model.shape()) / 1e9, 'top1': {r: 100 * c.mean() for r, c in correct.items()},
               **differences}
        results[mode] = row
        print(f'{mode}-only, same fraction per block, {row["gflops"]:.3f} GFLOPs, {len(paths)} images of '
              f'{args.split}/: ' + ', '.join(f'{r} {v:.2f}%' for r, v in row['top1'].items()))
        for key, result in differences.items():
            print(f'  {key}: {difference_text(result)}')
    if args.out:
        atomic_write_text(json.dumps(results, indent=1) + '\n', args.out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
