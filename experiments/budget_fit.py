"""Learned schedules brought onto a budget keeping their shape (models.onto_budget; a schedule a
search filed at that budget is already on it) against the hand-set rules at exactly that budget, on
the same trained weights and images: the geometric merge schedule, ToMe's (where it reaches) and the
back-loaded family for each number of dense blocks (with --choose-on, only its member best on that
earlier evaluation, so that test/ reports the member val/ chose). Top-1, each learned schedule minus
each rule as paired differences with 95% intervals, the image-by-image correctness, and the learned
schedule and the rule best on this split with the main.py flags that run them. --as-learned scores
the counts a search learned instead of those it filed (the search where it stopped).

    python -m experiments.budget_fit CHECKPOINT --data-path DATA --split val --target_flops 0.145 \
        --learned 'seed 0=SEARCH/compression_rate.json:sdt2net_tiny_patch16_224:0.145' --out val.json
"""
import json
import sys
from typing import Dict, List, Optional, Tuple

import models
from datasets import build_transform
from utils import ArgumentParser, UserError, atomic_write_text, error_boundary
from workflow.runs import load_trained_model
from workflow.schedule_file import load_schedule, read_file
from workflow.stats import correct_on_split, difference_text, paired_differences

GEOMETRIC, TOME = 'geometric', 'ToMe (same count)'


def parse_learned(spec: str) -> Tuple[str, str, str, float]:
    """'[LABEL=]FILE:MODEL:GFLOPS' -> (label, file, model name, GFLOPs of the entry)."""
    label, _, rest = spec.partition('=') if '=' in spec else ('', '', spec)
    try:
        path, name, gflops = rest.rsplit(':', 2)
        return label or f'learned {gflops}', path, name, float(gflops)
    except ValueError:
        raise UserError(f'--learned {spec!r}: expected [LABEL=]FILE:MODEL:GFLOPS, e.g. '
                        'compression_rate.json:sdt2net_tiny_patch16_224:0.176') from None


def searched_counts(path: str, name: str, gflops: float) -> models.Schedule:
    """The counts a search learned, which it files beside the schedule it brought onto its budget."""
    for key, entry in read_file(path).get(name, {}).items():
        if abs(float(key) - gflops) < 1e-6 and isinstance(entry, dict) and isinstance(entry.get('learned'), dict):
            return models.Schedule(entry['learned']['prune_kept_num'], entry['learned']['merge_kept_num'])
    raise UserError(f'{path} holds no learned counts for {name} at {gflops} GFLOPs (a search files them)')


def rules(shape: models.ModelShape, target: float, backloaded: Optional[int]) -> Dict[str, Tuple[models.Schedule, List[str]]]:
    """{label: (schedule, main.py flags)} of the hand-set rules at `target` GFLOPs: geometric, ToMe's
    where it reaches, and the back-loaded family (only `backloaded` dense blocks when given)."""
    found = {GEOMETRIC: (models.uniform_schedule(shape, target, 'merge', 'ratio'), ['--fixed-schedule', 'geometric'])}
    try:
        found[TOME] = (models.uniform_schedule(shape, target, 'merge', 'count'), ['--fixed-schedule', 'uniform'])
    except ValueError:
        pass  # ToMe's schedule cannot go below about half the dense FLOPs
    for dense_blocks in [backloaded] if backloaded is not None else range(1, shape.depth - 1):
        try:
            found[f'backloaded {dense_blocks}'] = (
                models.uniform_schedule(shape, target, 'merge', 'ratio', dense_blocks),
                ['--fixed-schedule', 'backloaded', '--dense-blocks', str(dense_blocks)])
        except ValueError:
            break  # more dense blocks leave too few to reach the budget
    return found


def best_backloaded(path: str) -> int:
    """The number of dense blocks of the back-loaded member with the best top-1 in an earlier --out."""
    try:
        earlier = json.load(open(path))['schedules']
        members = {label: result['top1'] for label, result in earlier.items() if label.startswith('backloaded ')}
        return int(max(members, key=members.get).split()[1])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f'--choose-on {path}: not an --out file of this script with back-loaded rules ({error})') from None


@error_boundary
def main(argv=None) -> int:
    parser = ArgumentParser(prog='budget_fit.py', description=__doc__.splitlines()[0])
    parser.add_argument('checkpoint', help='a trained checkpoint written by main.py (its weights are used)')
    parser.add_argument('--data-path', required=True, help='ImageFolder root with the split below')
    parser.add_argument('--split', default='val')
    parser.add_argument('--learned', action='append', required=True, metavar='[LABEL=]FILE:MODEL:GFLOPS',
                        help='a learned schedule: the entry of a compression_rate.json (repeat for several)')
    parser.add_argument('--target_flops', type=float, required=True, help='the budget (GFLOPs)')
    parser.add_argument('--choose-on', default='', metavar='JSON',
                        help='an earlier --out (on val/): evaluate only its best back-loaded member')
    parser.add_argument('--as-learned', action='store_true',
                        help="score the counts each search learned (filed beside its schedule) instead: with "
                             "--target_flops at their FLOPs, the search's own schedule where it stopped")
    parser.add_argument('--out', default='', help='also write the results here (JSON)')
    args = parser.parse_args(argv)
    specs = [parse_learned(spec) for spec in args.learned]
    backloaded = best_backloaded(args.choose_on) if args.choose_on else None
    model, run_args = load_trained_model(args.checkpoint)
    shape = model.shape()
    learned: Dict[str, Tuple[models.Schedule, Optional[List[str]]]] = {}
    try:
        for label, path, name, gflops in specs:
            # a file's entry at this budget runs as it is filed; another is brought onto it here
            on_budget = abs(gflops - args.target_flops) < 1e-9 and not args.as_learned
            flags = ['--load_compression_rate', '--compression-rate-file', path] if on_budget else None
            schedule = searched_counts(path, name, gflops) if args.as_learned else load_schedule(path, name, gflops)
            learned[label] = (models.onto_budget(schedule, shape, args.target_flops), flags)
        hand_set = rules(shape, args.target_flops, backloaded)
    except ValueError as error:
        raise UserError(str(error)) from None
    split, transform = f'{args.data_path}/{args.split}', build_transform(False, run_args)
    correct, schedules = {}, {}
    for kind, group in (('learned', learned), ('rule', hand_set)):
        for label, (schedule, flags) in group.items():
            model.fix_schedule(schedule)
            _, correct[label] = correct_on_split(model, split, model.class_names, transform)
            schedules[label] = {'kind': kind, 'gflops': schedule.flops(shape) / 1e9, 'top1': 100 * correct[label].mean(),
                                **schedule.as_dict(), 'flags': flags,
                                'correct': ''.join('1' if c else '0' for c in correct[label])}
            print(f'{label:28s} {schedules[label]["gflops"]:.4f} GFLOPs  top-1 {schedules[label]["top1"]:.2f}%  '
                  f'merge {list(schedule.merge)}')
    differences = paired_differences(correct, [(a, b) for a in learned for b in hand_set])
    for key, result in differences.items():
        print(f'{key}: {difference_text(result)}')
    chosen = {}  # the best of each kind on this split (learned: among those that run as filed)
    for kind in ('learned', 'rule'):
        candidates = [label for label, s in schedules.items() if s['kind'] == kind and s['flags'] is not None]
        if candidates:
            best = max(candidates, key=lambda label: schedules[label]['top1'])
            chosen[kind] = {'label': best, 'flags': schedules[best]['flags']}
            print(f'best {kind} on {args.split}: {best}')
    if args.out:
        results = {'split': args.split, 'target_flops': args.target_flops, 'schedules': schedules,
                   'differences': differences, 'chosen': chosen}
        atomic_write_text(json.dumps(results, indent=1) + '\n', args.out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
