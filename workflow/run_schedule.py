"""Which schedule a run uses, decided in one place once its weights are loaded, and where a new
search starts."""
from typing import Any, Dict, Optional, Tuple

import models
from models import Schedule
from utils import UserError
from workflow.runs import checkpoint_schedule
from workflow.schedule_file import load_schedule

FIXED_SCHEDULES = ('dense', 'uniform', 'uniform-prune', 'geometric', 'geometric-prune', 'backloaded')
SCHEDULE_VARIANTS = ('as-is', 'prune-only', 'merge-only')


def resolve_schedule(args, model: models.SDT2Net, resumed: Optional[Dict[str, Any]],
                     weights: Optional[Dict[str, Any]]) -> Tuple[Optional[Schedule], str]:
    """The schedule this run uses: a fixed Schedule, or None for the learned rates; and why.

    In order: --load_compression_rate (the file's entry), --fixed-schedule, the schedule a
    resumed run had, for --eval the schedule stored with the --finetune weights, else the rates
    (learned; fixed at their current values with --search-mode weights). --schedule-variant
    turns a fixed schedule into its prune-only or merge-only form at the same token counts.
    """
    shape = model.shape()
    if args.load_compression_rate:
        schedule = load_schedule(args.compression_rate_file, args.model, args.target_flops)
        origin = f'{args.compression_rate_file} at {args.target_flops} GFLOPs'
    elif args.fixed_schedule == 'dense':
        schedule, origin = Schedule.dense(shape.depth, shape.num_patches, shape.num_prefix), 'dense (every token kept)'
    elif args.fixed_schedule:  # uniform[-prune] (same count per block), geometric[-prune] (same fraction),
        # backloaded (the same fraction merged after --dense-blocks blocks that keep every token)
        mode = 'prune' if args.fixed_schedule.endswith('-prune') else 'merge'
        spacing = 'count' if args.fixed_schedule.startswith('uniform') else 'ratio'
        dense_blocks = args.dense_blocks if args.fixed_schedule == 'backloaded' else 0
        try:
            schedule = models.uniform_schedule(shape, args.target_flops, mode, spacing, dense_blocks)
        except ValueError as error:
            raise UserError(str(error)) from None
        origin = f'{args.fixed_schedule} schedule at {args.target_flops} GFLOPs' + \
            (f' after {dense_blocks} dense blocks' if dense_blocks else '')
    elif resumed is not None and checkpoint_schedule(resumed, '--resume') is not None:
        schedule, fixed = checkpoint_schedule(resumed, '--resume')
        if not fixed:
            return None, 'learned (the resumed run\'s rates)'
        origin = 'fixed by the resumed run'
    elif args.eval and checkpoint_schedule(weights, '--finetune') is not None:
        schedule, _ = checkpoint_schedule(weights, '--finetune')
        origin = 'stored with the --finetune weights'
    elif args.search_mode == 'weights' and not args.eval:
        schedule, origin = model.schedule(), 'the rates\' current counts, fixed for fine-tuning'
    else:
        return None, f'learned (search from the {args.search_start} start)' if resumed is None else 'learned'
    if args.schedule_variant == 'prune-only':
        schedule, origin = schedule.prune_only(), origin + ', prune-only variant'
    elif args.schedule_variant == 'merge-only':
        schedule, origin = schedule.merge_only(), origin + ', merge-only variant'
    try:
        schedule.check(shape.depth, shape.num_patches, shape.num_prefix)
    except ValueError as error:
        raise UserError(f'schedule ({origin}) does not fit the model: {error}') from None
    return schedule, origin


def start_search(model: models.SDT2Net, start: str, start_flops: float) -> None:
    """Set the rates of a new search to its start: uniform, dense, or the geometric merge schedule
    at `start_flops` GFLOPs."""
    if start != 'geometric':
        model.rates.reset(start)
        return
    try:
        schedule = models.uniform_schedule(model.shape(), start_flops, mode='merge', spacing='ratio')
    except ValueError as error:
        raise UserError(f'--search-start geometric: {error}') from None
    model.rates.start_at(schedule)
