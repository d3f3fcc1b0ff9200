"""A learned schedule brought onto a lower budget keeping its shape (models.onto_budget) against the
hand-set rules at exactly that budget, on the same trained weights and images: the geometric merge
schedule, ToMe's (where it reaches) and the back-loaded family for each number of dense blocks;
top-1 and each rule minus the fitted schedule as paired differences with 95% intervals.

    python -m experiments.budget_fit CHECKPOINT --data-path DATA --split val \
        --schedule compression_rate.json:sdt2net_tiny_patch16_224:0.176 --target_flops 0.145
"""
import json
import sys

import models
from datasets import build_transform
from utils import ArgumentParser, UserError, atomic_write_text, error_boundary
from workflow.runs import load_trained_model
from workflow.schedule_file import load_schedule
from workflow.stats import correct_on_split, difference_text, paired_differences


@error_boundary
def main(argv=None) -> int:
    parser = ArgumentParser(prog='budget_fit.py', description=__doc__.splitlines()[0])
    parser.add_argument('checkpoint', help='a trained checkpoint written by main.py (its weights are used)')
    parser.add_argument('--data-path', required=True, help='ImageFolder root with the split below')
    parser.add_argument('--split', default='val')
    parser.add_argument('--schedule', required=True, metavar='FILE:MODEL:GFLOPS', help='the learned schedule')
    parser.add_argument('--target_flops', type=float, required=True, help='the budget it is brought onto')
    parser.add_argument('--out', default='', help='also write the results here (JSON)')
    args = parser.parse_args(argv)
    try:
        path, name, gflops = args.schedule.rsplit(':', 2)
        learned = load_schedule(path, name, float(gflops))
    except ValueError:
        raise UserError('--schedule takes FILE:MODEL:GFLOPS, e.g. '
                        'compression_rate.json:sdt2net_tiny_patch16_224:0.176') from None
    model, run_args = load_trained_model(args.checkpoint)
    shape = model.shape()
    try:
        schedules = {'learned, brought onto the budget': models.onto_budget(learned, shape, args.target_flops)}
        schedules['geometric'] = models.uniform_schedule(shape, args.target_flops, 'merge', 'ratio')
    except ValueError as error:
        raise UserError(str(error)) from None
    try:
        schedules['ToMe (same count)'] = models.uniform_schedule(shape, args.target_flops, 'merge', 'count')
    except ValueError:
        pass  # ToMe's schedule cannot go below about half the dense FLOPs
    for dense_blocks in range(1, shape.depth - 1):
        try:
            schedules[f'backloaded {dense_blocks}'] = models.uniform_schedule(
                shape, args.target_flops, 'merge', 'ratio', dense_blocks)
        except ValueError:
            break  # more dense blocks leave too few to reach the budget
    split, transform = f'{args.data_path}/{args.split}', build_transform(False, run_args)
    correct, results = {}, {}
    for label, schedule in schedules.items():
        model.fix_schedule(schedule)
        _, correct[label] = correct_on_split(model, split, model.class_names, transform)
        results[label] = {'gflops': schedule.flops(shape) / 1e9, 'top1': 100 * correct[label].mean(),
                          **schedule.as_dict()}
        print(f'{label:34s} {results[label]["gflops"]:.4f} GFLOPs  top-1 {results[label]["top1"]:.2f}%  '
              f'merge {list(schedule.merge)}')
    fitted = 'learned, brought onto the budget'
    results['differences'] = paired_differences(correct, [(label, fitted) for label in schedules if label != fitted])
    for key, result in results['differences'].items():
        print(f'{key}: {difference_text(result)}')
    if args.out:
        atomic_write_text(json.dumps(results, indent=1) + '\n', args.out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
