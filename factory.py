"""What a run is made of, shared by main.py, visualize.py and the experiment scripts: the model
with its starting weights, and the schedule the run uses (decided in one place)."""
import json
import os
from types import SimpleNamespace
from typing import Any, Dict, Optional, Tuple

import timm
import torch

import models
from compression_schedule import load_schedule
from models import Schedule
from utils import UserError, load_checkpoint

FIXED_SCHEDULES = ('dense', 'uniform', 'uniform-prune', 'geometric', 'geometric-prune')
SCHEDULE_VARIANTS = ('as-is', 'prune-only', 'merge-only')


# The arguments that define the network and its evaluation transform (what a release file keeps).
MODEL_ARGUMENTS = ('model', 'input_size', 'drop', 'drop_path', 'no_eab', 'no_ftf', 'eab_ratio', 'eab_groups',
                   'eab_shift', 'eab_separate', 'granularity', 'merge_rule')


def create_model(args, num_classes: int) -> models.SDT2Net:
    """The architecture of `args` with its initial (or timm's pretrained DeiT) weights."""
    try:
        return timm.create_model(
            args.model, pretrained=args.pretrained, num_classes=num_classes, img_size=args.input_size,
            drop_rate=args.drop, drop_path_rate=args.drop_path, eab=not args.no_eab, ftf=not args.no_ftf,
            eab_ratio=args.eab_ratio, eab_groups=args.eab_groups, eab_shift=getattr(args, 'eab_shift', 2),
            eab_shared=not getattr(args, 'eab_separate', False), granularity=args.granularity,
            merge_rule=getattr(args, 'merge_rule', 'size-weighted'))
    except (OSError, RuntimeError) as error:  # hub download failures surface as these
        if not args.pretrained:
            raise
        raise UserError(f'could not fetch the pretrained DeiT weights ({str(error).splitlines()[0]}); '
                        f'offline, pass a local checkpoint with --finetune PATH') from None


def load_weights(model: models.SDT2Net, path: str) -> Dict[str, Any]:
    """Load the network weights of a DeiT or SDT2Net checkpoint (never its schedule); returns
    the checkpoint, whose 'schedule' entry the caller may use explicitly."""
    checkpoint = load_checkpoint(path)
    try:
        weights = models.adapt_state_dict(checkpoint, model)
    except ValueError as error:
        raise UserError(f'--finetune {path}: {error}') from None
    missing, _ = model.load_state_dict(weights, strict=False)
    new = [k for k in missing if not k.startswith('rates.')]
    print(f'loaded {len(weights)} weight tensors from {path}; new: {len(new)}'
          + (f' (e.g. {", ".join(new[:4])})' if new else ''))
    return checkpoint


def model_state(checkpoint: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The model entries of a checkpoint of this code, without the fixed-schedule buffer that
    earlier versions stored among them (the schedule is read by checkpoint_schedule)."""
    return {k: v for k, v in models.unwrap_state_dict(checkpoint['model']).items() if k != 'rates.fixed'}


def checkpoint_schedule(checkpoint: Optional[Dict[str, Any]]) -> Optional[Tuple[Schedule, bool]]:
    """(schedule, was it fixed) stored in a checkpoint of this code, or None."""
    if not checkpoint:
        return None
    entry = checkpoint.get('schedule')
    if isinstance(entry, dict):
        return Schedule(entry['prune'], entry['merge']), bool(entry['fixed'])
    if 'prune_kept_num' in checkpoint:  # written by earlier versions: the lists and a rates.fixed buffer
        fixed = models.unwrap_state_dict(checkpoint).get('rates.fixed')
        return (Schedule(checkpoint['prune_kept_num'], checkpoint['merge_kept_num']),
                fixed is not None and bool((fixed >= 0).all()))
    return None


def schedule_entry(model: models.SDT2Net) -> Dict[str, Any]:
    """The 'schedule' entry of a checkpoint: the schedule in force and whether it is fixed."""
    schedule = model.schedule()
    return {'prune': list(schedule.prune), 'merge': list(schedule.merge), 'fixed': model.schedule_is_fixed}


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
        schedule, origin = Schedule.dense(shape.depth, shape.num_patches), 'dense (every token kept)'
    elif args.fixed_schedule:  # uniform[-prune] (same count per block) or geometric[-prune] (same fraction)
        mode = 'prune' if args.fixed_schedule.endswith('-prune') else 'merge'
        spacing = 'ratio' if args.fixed_schedule.startswith('geometric') else 'count'
        try:
            schedule = models.uniform_schedule(shape, args.target_flops, mode, spacing)
        except ValueError as error:
            raise UserError(str(error)) from None
        origin = f'{args.fixed_schedule} schedule at {args.target_flops} GFLOPs'
    elif resumed is not None and checkpoint_schedule(resumed) is not None:
        schedule, fixed = checkpoint_schedule(resumed)
        if not fixed:
            return None, 'learned (the resumed run\'s rates)'
        origin = 'fixed by the resumed run'
    elif args.eval and checkpoint_schedule(weights) is not None:
        schedule, _ = checkpoint_schedule(weights)
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
        schedule.check(shape.depth, shape.num_patches)
    except ValueError as error:
        raise UserError(f'schedule ({origin}) does not fit the model: {error}') from None
    return schedule, origin


def load_run_model(run: str, checkpoint_name: str = 'checkpoint.pth') -> Tuple[models.SDT2Net, SimpleNamespace]:
    """A run folder's model with its checkpoint's weights and schedule, in evaluation mode; and
    the run's arguments (args.json)."""
    return load_trained_model(os.path.join(run, checkpoint_name))


def load_trained_model(path: str, checkpoint: Optional[Dict] = None) -> Tuple[models.SDT2Net, SimpleNamespace]:
    """The model of a checkpoint written by main.py, with its weights and its schedule fixed, in
    evaluation mode; and the arguments of the run that wrote it (stored in model_best.pth, else
    the run folder's args.json). checkpoint: its content when the caller has read it already."""
    if checkpoint is None:
        checkpoint = load_checkpoint(path)
    if 'model' not in checkpoint or 'class_names' not in checkpoint:
        raise UserError(f'{path} is not a checkpoint written by main.py (no model or class names)')
    stored = checkpoint.get('args')
    if stored is None:
        args_path = os.path.join(os.path.dirname(os.path.abspath(path)), 'args.json')
        if not os.path.isfile(args_path):
            raise UserError(f'{path} holds no run arguments and there is no args.json beside it')
        with open(args_path) as f:
            stored = json.load(f)
    # the run's configuration, without fetching or loading its starting weights again
    args = SimpleNamespace(**{**stored, 'pretrained': False, 'finetune': ''})
    model = create_model(args, num_classes=len(checkpoint['class_names']))
    try:
        model.load_state_dict(model_state(checkpoint))
    except RuntimeError as error:
        raise UserError(f'{path} does not fit the model its arguments describe: {str(error).splitlines()[0]}') from None
    stored_schedule = checkpoint_schedule(checkpoint)
    if stored_schedule is not None:
        model.fix_schedule(stored_schedule[0])  # what the run used when it saved (learned: its hard counts)
    model.class_names = list(checkpoint['class_names'])
    return model.eval(), args
