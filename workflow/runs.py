"""Checkpoints, release files and run folders: what main.py writes and what every tool reads.

A run folder (main.py --output_dir) holds args.json (the resolved arguments), log.txt (one JSON
line per epoch), checkpoint.pth (everything a resume needs), model_best.pth (what evaluation
needs), compression_rate.json and, after --eval --output_dir RUN/eval, eval/eval_metrics.json,
eval/predictions.csv and eval/per_class.csv. Checkpoints hold plain data only and load with
torch.load(..., weights_only=True).
"""
import glob
import json
import os
import re
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Tuple

import timm
import torch

import models
from models import Schedule
from utils import UserError, atomic_torch_save, atomic_write_text, error_line, read_json, rng_state
from workflow.schedule_file import diffrate_key, save_schedule


def load_checkpoint(path: str) -> Dict[str, Any]:
    """torch.load with weights_only=True and a clear error for missing or foreign files."""
    if not os.path.isfile(path):
        raise UserError(f'checkpoint not found: {path}')
    if path.lower().endswith('.onnx'):
        raise UserError(f'{path} is an ONNX graph (export.py onnx), not a checkpoint: start from the .pth '
                        f'it was exported from')
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as error:  # unpickling errors come in many types
        raise UserError(f'cannot read checkpoint {path}: {error_line(error)}') from None
    if not isinstance(checkpoint, dict):
        raise UserError(f'{path} is not a checkpoint: it holds a {type(checkpoint).__name__}, not a dict')
    return checkpoint


# The arguments that define the network and its evaluation transform (what a release file keeps),
# and the values of those that runs of earlier versions did not record.
MODEL_ARGUMENTS = ('model', 'input_size', 'drop', 'drop_path', 'no_eab', 'no_ftf', 'eab_ratio', 'eab_groups',
                   'eab_shift', 'eab_separate', 'granularity', 'merge_rule', 'importance')
MODEL_DEFAULTS = {'eab_shift': 2, 'eab_separate': False, 'merge_rule': 'size-weighted', 'importance': None}


def create_model(args, num_classes: int) -> models.SDT2Net:
    """The architecture of `args` with its initial (or timm's pretrained DeiT) weights."""
    try:
        return timm.create_model(
            args.model, pretrained=args.pretrained, num_classes=num_classes, img_size=args.input_size,
            **({'pretrained_cfg_overlay': dict(file=args.pretrained_file)} if getattr(args, 'pretrained_file', '') else {}),
            drop_rate=args.drop, drop_path_rate=args.drop_path, eab=not args.no_eab, ftf=not args.no_ftf,
            eab_ratio=args.eab_ratio, eab_groups=args.eab_groups, eab_shift=args.eab_shift,
            eab_shared=not args.eab_separate, granularity=args.granularity, merge_rule=args.merge_rule,
            importance=args.importance)
    except (OSError, RuntimeError) as error:  # hub download failures surface as these
        if not args.pretrained:
            raise UserError(f'cannot build {args.model} with these flags: {error_line(error)}') from None
        raise UserError(f'could not load the pretrained weights of {args.model} ({error_line(error)}); '
                        f'offline, pass a local file with --pretrained-file PATH or --finetune PATH') from None
    except (ValueError, TypeError, AssertionError) as error:  # e.g. --eab-groups that does not divide the width
        raise UserError(f'cannot build {args.model} with these flags: {error_line(error)}') from None


def load_weights(model: models.SDT2Net, path: str) -> Dict[str, Any]:
    """Load the network weights of a DeiT or SDT2Net checkpoint (never its schedule); returns
    the checkpoint, whose 'schedule' entry the caller may use explicitly."""
    checkpoint = load_checkpoint(path)
    try:
        weights = models.adapt_state_dict(checkpoint, model)
    except (ValueError, TypeError, AttributeError) as error:
        raise UserError(f'--finetune {path}: not the weights of a DeiT or SDT2Net ({error_line(error)})') from None
    check_weights(weights, path)
    missing, _ = model.load_state_dict(weights, strict=False)
    new = [k for k in missing if not k.startswith('rates.')]
    print(f'loaded {len(weights)} weight tensors from {path}; new: {len(new)}'
          + (f' (e.g. {", ".join(new[:4])})' if new else ''))
    return checkpoint


def model_state(checkpoint: Dict[str, Any], path: str) -> Dict[str, torch.Tensor]:
    """The model entries of a checkpoint of this code, without the fixed-schedule buffer that
    earlier versions stored among them (the schedule is read by checkpoint_schedule); refuses
    entries that are not tensors and weights that are not finite (a run that diverged)."""
    weights = {k: v for k, v in models.unwrap_state_dict(checkpoint['model']).items() if k != 'rates.fixed'}
    check_weights(weights, path)
    return weights


def check_weights(weights: Dict[str, Any], path: str) -> None:
    """UserError for entries that are not tensors or floating-point weights that are NaN or inf."""
    wrong = [k for k, v in weights.items() if not isinstance(v, torch.Tensor)]
    if wrong:
        raise UserError(f'{path} is not a checkpoint of this code: {wrong[0]} is not a tensor')
    bad = [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise UserError(f'{path} holds weights that are not finite ({", ".join(bad[:3])}'
                        f'{", ..." if len(bad) > 3 else ""}): the run that wrote it diverged')


def checkpoint_schedule(checkpoint: Optional[Dict[str, Any]], path: str = 'the checkpoint'
                        ) -> Optional[Tuple[Schedule, bool]]:
    """(schedule, was it fixed) stored in a checkpoint of this code, or None."""
    if not checkpoint:
        return None
    try:
        entry = checkpoint.get('schedule')
        if isinstance(entry, dict):
            return Schedule(entry['prune'], entry['merge']), bool(entry['fixed'])
        if 'prune_kept_num' in checkpoint:  # written by earlier versions: the lists and a rates.fixed buffer
            fixed = models.unwrap_state_dict(checkpoint).get('rates.fixed')
            return (Schedule(checkpoint['prune_kept_num'], checkpoint['merge_kept_num']),
                    fixed is not None and bool((fixed >= 0).all()))
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise UserError(f'{path}: its schedule entry is malformed ({error_line(error)})') from None
    return None


def schedule_entry(model: models.SDT2Net) -> Dict[str, Any]:
    """The 'schedule' entry of a checkpoint: the schedule in force and whether it is fixed."""
    schedule = model.schedule()
    return {'prune': list(schedule.prune), 'merge': list(schedule.merge), 'fixed': model.schedule_is_fixed}


def run_arguments(path: str, checkpoint: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The arguments of the run that wrote the checkpoint at `path`: stored in it (every checkpoint
    of main.py and release files), else the args.json of its folder; None if neither exists."""
    stored = checkpoint.get('args')
    if isinstance(stored, dict):
        return stored
    args_path = os.path.join(os.path.dirname(os.path.abspath(path)), 'args.json')
    return read_json(args_path) if os.path.isfile(args_path) else None


def load_trained_model(path: str, checkpoint: Optional[Dict] = None) -> Tuple[models.SDT2Net, SimpleNamespace]:
    """The model of a checkpoint written by main.py (or a release file), with its weights and its
    schedule fixed, in evaluation mode; and the arguments of the run that wrote it.
    checkpoint: its content when the caller has read it already."""
    if checkpoint is None:
        checkpoint = load_checkpoint(path)
    if not isinstance(checkpoint.get('model'), dict) or not isinstance(checkpoint.get('class_names'), list):
        raise UserError(f'{path} is not a checkpoint written by main.py (no model or class names)')
    stored = run_arguments(path, checkpoint)
    if stored is None:
        raise UserError(f'{path} holds no run arguments and there is no args.json beside it')
    # the run's configuration, without fetching or loading its starting weights again
    args = SimpleNamespace(**{**MODEL_DEFAULTS, **stored, 'pretrained': False, 'finetune': ''})
    model = create_model(args, num_classes=len(checkpoint['class_names']))
    load_exactly(model, model_state(checkpoint, path), f'{path} does not fit the model its arguments describe')
    try:
        schedule = checkpoint_schedule(checkpoint, path)
        if schedule is not None:
            model.fix_schedule(schedule[0])  # what the run used when it saved (learned: its hard counts)
    except ValueError as error:  # a schedule that does not fit the model
        raise UserError(f'{path}: its schedule does not fit the model ({error_line(error)})') from None
    model.class_names = list(checkpoint['class_names'])
    return model.eval(), args


def load_resumed_model(model: models.SDT2Net, state: Dict, path: str, args, class_names) -> None:
    """The resumed run's model state (weights and rates); its schedule is restored by
    resolve_schedule from the checkpoint's 'schedule' entry."""
    check_checkpoint_fits(state, path, args, class_names)
    load_exactly(model, model_state(state, path), f'{path} does not fit {args.model} with these flags')


def load_exactly(model: models.SDT2Net, weights: Dict[str, torch.Tensor], problem: str) -> None:
    """Load every weight of the model and nothing else; UserError `problem`: what differs."""
    target = model.state_dict()
    mismatched = [f'{k}: checkpoint {tuple(v.shape)}, model {tuple(target[k].shape)}'
                  for k, v in weights.items() if k in target and v.shape != target[k].shape]
    missing, unexpected = [k for k in target if k not in weights], [k for k in weights if k not in target]
    if mismatched or missing or unexpected:
        found = (f'missing {", ".join(missing[:3])}' if missing else '') + \
            (f' unexpected {", ".join(unexpected[:3])}' if unexpected else '') or mismatched[0]
        raise UserError(f'{problem}: {found.strip()}')
    model.load_state_dict(weights)


# The flags that change the network a checkpoint holds, by their args.json key.
NETWORK_FLAGS = {'no_eab': '--no-eab', 'no_ftf': '--no-ftf', 'input_size': '--input-size',
                 'granularity': '--granularity', 'eab_ratio': '--eab-ratio', 'eab_groups': '--eab-groups',
                 'eab_separate': '--eab-separate', 'eab_shift': '--eab-shift', 'merge_rule': '--merge-rule'}


COMPONENTS = {'no_eab': 'the EAB', 'no_ftf': 'the FTF head'}  # the switches, by what they switch off


def network_mismatch(stored: Optional[Dict[str, Any]], args) -> Optional[str]:
    """'--input-size 64 but the checkpoint has 48' for the first flag that defines the network and
    differs from the run that wrote the checkpoint; None if none differs (or nothing is stored)."""
    for key, flag in NETWORK_FLAGS.items():
        if stored is None or key not in stored or stored[key] == getattr(args, key, stored[key]):
            continue
        if key in COMPONENTS:
            has = not stored[key]
            return f'it {"has" if has else "has no"} {COMPONENTS[key]}: {"remove" if has else "add"} {flag}'
        if isinstance(stored[key], bool):
            verb = 'add' if stored[key] else 'remove'
            return f'it was trained {"with" if stored[key] else "without"} {flag}: {verb} {flag}'
        return f'{flag} {getattr(args, key)} but the checkpoint has {stored[key]}; use {flag} {stored[key]}'
    return None


def check_checkpoint_fits(state: Dict, path: str, args, class_names) -> None:
    """Clear errors for a checkpoint of another architecture, network flag or class list."""
    if not isinstance(state.get('model'), dict):
        raise UserError(f'{path} is not a checkpoint written by this code (no "model" entry)')
    saved = state.get('model_name')
    if saved is not None and diffrate_key(str(saved)) != diffrate_key(args.model):
        raise UserError(f'{path} holds a {saved} model, not {args.model}')
    mismatch = network_mismatch(run_arguments(path, state), args)
    if mismatch:
        raise UserError(f'{path} was trained with other settings: {mismatch}')
    if state.get('class_names') is not None and list(state['class_names']) != list(class_names):
        raise UserError(f'{path} was trained on {len(state["class_names"])} other classes than the '
                        f'{len(class_names)} in the data')


def write_per_class(path: str, metrics: Dict, class_names: List[str]) -> None:
    """Images, precision, recall and F1 (%) of every class, from evaluate's metrics."""
    counts = [sum(row) for row in metrics['confusion_matrix']]
    lines = ['class,images,precision,recall,f1'] + [
        f'{name},{n},{p:.2f},{r:.2f},{f:.2f}' for name, n, p, r, f in zip(
            class_names, counts, metrics['per_class_precision'], metrics['per_class_recall'],
            metrics['per_class_f1'])]
    atomic_write_text('\n'.join(lines) + '\n', path)


def write_predictions(path: str, dataset, predictions: List[int]) -> None:
    """One row per image in dataset order: index, file (class/name), target, top-1 prediction.
    Two evaluations of the same images are compared pairwise with compare.py."""
    if hasattr(dataset, 'samples'):
        names = [os.path.join(os.path.basename(os.path.dirname(p)), os.path.basename(p)) for p, _ in dataset.samples]
        targets = [t for _, t in dataset.samples]
    else:  # synthetic: sample i has class i mod classes
        names = [f'synthetic/{i}' for i in range(len(predictions))]
        targets = [i % len(dataset.classes) for i in range(len(predictions))]
    lines = ['index,file,target,prediction'] + [f'{i},{names[i]},{targets[i]},{p}' for i, p in enumerate(predictions)]
    atomic_write_text('\n'.join(lines) + '\n', path)


@dataclass(frozen=True)
class Filing:
    """What compression_rate.json files for a run: `schedule` under the budget `key` (GFLOPs), and
    the provenance beside it; `note`: one line for the log when it is not the schedule in force."""
    key: float
    schedule: models.Schedule
    provenance: Dict[str, Any]
    note: str = ''


def file_schedule(model: models.SDT2Net, target_flops: float) -> Filing:
    """A fixed schedule is filed as it is under --target_flops. A learned one is brought onto the
    budget keeping its shape (models.onto_budget: at or below it, within BUDGET_TOLERANCE), with the
    counts it learned recorded beside it; when nothing brings it there, it is filed as it is under
    the FLOPs it reaches, never under a budget it does not meet."""
    shape, schedule = model.shape(), model.schedule()
    reached = schedule.flops(shape) / 1e9
    if model.schedule_is_fixed:
        return Filing(target_flops, schedule, {'target_flops': target_flops, 'gflops': round(reached, 4)})
    learned = {**schedule.as_dict(), 'gflops': round(reached, 4)}
    try:
        filed = models.onto_budget(schedule, shape, target_flops)
    except ValueError as error:
        key = float(f'{reached:.4g}')
        note = (f'the learned schedule reaches {reached:.4f} GFLOPs, {100 * (reached / target_flops - 1):+.1f}% '
                f'from --target_flops {target_flops} ({error}); filed under {key:g}')
        return Filing(key, schedule, {'target_flops': target_flops, 'gflops': round(reached, 4)}, note)
    gflops = filed.flops(shape) / 1e9
    note = '' if filed == schedule else (f'filed at {gflops:.4f} GFLOPs for --target_flops {target_flops} (learned '
                                         f'{reached:.4f}, brought onto the budget keeping its shape): prune '
                                         f'{list(filed.prune)}, merge {list(filed.merge)}')
    return Filing(target_flops, filed, {'target_flops': target_flops, 'gflops': round(gflops, 4), 'learned': learned},
                  note)


def save_epoch(args, model, optimizers, schedulers, precision, model_ema, epoch, best_acc, is_best,
               class_names, run_id: str, metrics: Dict[str, float], anneal_from: Optional[float],
               filing: Filing) -> None:
    """checkpoint.pth (everything a resume needs), model_best.pth (what evaluation needs), both
    atomic, and the schedule filed in compression_rate.json format."""
    state = {
        'model': model.state_dict(), 'schedule': schedule_entry(model), 'model_name': args.model,
        'class_names': list(class_names),
        'optimizers': {k: o.state_dict() for k, o in optimizers.items()},
        'schedulers': {k: s.state_dict() for k, s in schedulers.items()},
        'scaler': precision.scaler.state_dict() if precision.scaler is not None else None,
        'model_ema': model_ema.module.state_dict() if model_ema is not None else None,
        'epoch': epoch, 'best_acc': best_acc, 'rng': rng_state(), 'run_id': run_id, 'anneal_from': anneal_from,
        'args': vars(args),
    }
    path = os.path.join(args.output_dir, 'checkpoint.pth')
    atomic_torch_save(state, path)
    if is_best:  # what evaluation needs, without the optimizer state (a third of the size)
        keep = ('model', 'schedule', 'model_name', 'class_names', 'epoch', 'run_id', 'args')
        atomic_torch_save({**{k: state[k] for k in keep}, 'metrics': metrics},
                          os.path.join(args.output_dir, 'model_best.pth'))
    save_schedule(os.path.join(args.output_dir, 'compression_rate.json'), args.model, filing.key, filing.schedule,
                  **filing.provenance, epoch=epoch, data=args.data_path or args.data_set, input_size=args.input_size)


def write_release(checkpoint_path: str, out_path: str) -> Dict:
    """Write the weights-only release file of a checkpoint; returns what it holds."""
    source = load_checkpoint(checkpoint_path)
    model, args = load_trained_model(checkpoint_path, source)
    content = {
        'model': model.state_dict(),
        'schedule': schedule_entry(model),
        'class_names': model.class_names,
        'args': {key: getattr(args, key) for key in MODEL_ARGUMENTS if hasattr(args, key)},
        'metrics': source.get('metrics'),
        'source': {'checkpoint': os.path.abspath(checkpoint_path), 'run_id': source.get('run_id'),
                   'epoch': source.get('epoch')},
    }
    atomic_torch_save(content, out_path)
    return content


# What the records of read_run hold, by key: numbers, or lists of integers (None where unknown).
NUMBER_KEYS = ('acc1', 'acc5', 'kappa', 'gflops', 'parameters', 'throughput')
COUNT_KEYS = ('prune_kept_num', 'merge_kept_num')


def read_run(folder: str) -> Optional[Dict]:
    """The run's arguments and metrics (its evaluation, else the last line of its log), or None
    if the folder holds no run of main.py; UserError for files that do not hold what they should."""
    args_path = os.path.join(folder, 'args.json')
    if not os.path.isfile(args_path):
        return None
    args = read_json(args_path)
    record = None
    for path in (os.path.join(folder, 'eval', 'eval_metrics.json'), os.path.join(folder, 'eval_metrics.json')):
        if os.path.isfile(path):
            record, source = read_json(path), path
            break
    else:
        if not os.path.isfile(os.path.join(folder, 'log.txt')):
            return None
        lines, source = read_log(folder), os.path.join(folder, 'log.txt')
        if not lines:
            return None
        last = lines[-1]
        record = {'acc1': last.get('test_acc1'), 'acc5': last.get('test_acc5'), 'kappa': last.get('test_kappa'),
                  'gflops': last.get('train_gflops'), 'parameters': last.get('n_parameters'),
                  'prune_kept_num': last.get('prune_kept_num'), 'merge_kept_num': last.get('merge_kept_num')}
    for key in NUMBER_KEYS:
        value = record.get(key)
        if not (value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))):
            raise UserError(f'{source}: {key} is not a number')
    for key in COUNT_KEYS:
        value = record.get(key)
        if not (value is None or (isinstance(value, list) and len(value) >= 2
                                  and all(isinstance(c, int) and not isinstance(c, bool) for c in value))):
            raise UserError(f'{source}: {key} is not a list of token counts')
    return {**record, 'args': args}


def read_log(run: str) -> List[Dict]:
    """The JSON lines of a run's log.txt, one per finished epoch."""
    path = os.path.join(run, 'log.txt')
    if not os.path.isfile(path):
        raise UserError(f'missing {path}')
    try:
        with open(path, 'rb') as f:
            lines = [json.loads(line) for line in f.read().decode('utf-8').splitlines() if line.strip()]
    except (UnicodeDecodeError, ValueError) as error:
        raise UserError(f'{path} is not a log of main.py ({error_line(error)})') from None
    if not all(isinstance(line, dict) for line in lines):
        raise UserError(f'{path} is not a log of main.py (a line is not a JSON object)')
    return lines


def eval_metrics(run: str) -> Dict:
    return read_json(os.path.join(run, 'eval', 'eval_metrics.json'))


class OutputFolder:
    """Claims --output_dir for one run: refuses a folder that holds another run unless it is
    continued (or --overwrite), and holds a lock file (OUT/.lock, the pid) so that a second run
    cannot write into a folder in use; a lock left by a dead process is taken over."""

    RUN_FILES = ('checkpoint.pth', 'log.txt')

    def __init__(self, path: str, continues: bool, overwrite: bool) -> None:
        self.path, self.lock = path, os.path.join(path, '.lock')
        held = [name for name in self.RUN_FILES if os.path.isfile(os.path.join(path, name))]
        if held and not (continues or overwrite):
            raise UserError(f'--output_dir {path} already holds a run ({", ".join(held)}); continue it with '
                            f'--autoresume, choose another folder, or replace it with --overwrite')
        try:
            os.makedirs(path, exist_ok=True)
            fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if self._holder_alive():
                raise UserError(f'--output_dir {path} is in use by another run (pid {self._holder()}); '
                                f'wait for it or choose another folder') from None
            os.remove(self.lock)  # stale: its process is gone
            fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except OSError as error:
            raise UserError(f'cannot write into --output_dir {path}: {error.strerror}') from None
        with os.fdopen(fd, 'w') as f:
            f.write(str(os.getpid()))
        for name in os.listdir(path):  # temporary files of a run that was killed while writing
            if '.tmp' in name and name.rsplit('.tmp', 1)[-1].isdigit():
                os.remove(os.path.join(path, name))

    def _holder(self) -> int:
        try:
            with open(self.lock) as f:
                return int(f.read().strip() or 0)
        except (OSError, ValueError):
            return 0

    def _holder_alive(self) -> bool:
        pid = self._holder()
        if pid <= 0:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def release(self) -> None:
        if self._holder() == os.getpid():
            os.remove(self.lock)


def seed_runs(folder: str) -> Dict[str, Dict[int, str]]:
    """{name: {seed: evaluation folder}} of the finished runs NAME_seedN under folder."""
    runs: Dict[str, Dict[int, str]] = {}
    for path in sorted(glob.glob(os.path.join(folder, '*_seed*', 'eval', 'eval_metrics.json'))):
        run = os.path.basename(os.path.dirname(os.path.dirname(path)))
        name, seed = re.fullmatch(r'(.+)_seed(\d+)', run).groups()
        runs.setdefault(name, {})[int(seed)] = os.path.dirname(path)
    return runs
