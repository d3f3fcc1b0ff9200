"""SDT2Net: search a compression schedule, fine-tune, or evaluate (DeiT-style entry point).

    python main.py --data-path DATA --output_dir OUT --model vit_deit_small_patch16_224 --target_flops 4.5
    python main.py --eval --load_compression_rate --data-path DATA --model ... --target_flops 4.5 --resume CKPT
    torchrun --nproc_per_node=N main.py ...
"""
import argparse
import contextlib
import json
import math
import os
import sys
import time
from typing import Dict, Tuple

import timm
import torch
from timm.data import Mixup
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader

import models
from datasets import UnreadableImageError, build_dataset, build_samplers, check_images
from engine import Precision, SearchObjective, evaluate, measure_throughput, train_one_epoch
from losses import build_criterion
from models.compression_rates import SEARCH_STARTS
from models.sdt2net import IMPORTANCES
from models.token_ops import MERGE_RULES
from utils import (ArgumentParser, NonFiniteError, ReplicasDisagreeError, UserError, append_json_line,
                   atomic_write_text, check_replicas_agree, error_boundary, error_line, get_world_size,
                   init_distributed, is_distributed, is_main_process, seed_everything, set_rng_state, unwrap)
from workflow.run_schedule import FIXED_SCHEDULES, SCHEDULE_VARIANTS, resolve_schedule, start_search
from workflow.runs import (OutputFolder, create_model, file_schedule, load_checkpoint, load_resumed_model, load_weights,
                           save_epoch, write_per_class, write_predictions)
from workflow.schedule_file import DEFAULT_FILE


def get_args_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog='main.py', description='SDT2Net: search a compression schedule, fine-tune '
                                'under one, or evaluate.', formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group('data')
    g.add_argument('--data-path', default='', type=str, help='ImageFolder root with train/ and val/ (and test/)')
    g.add_argument('--data-set', default='folder', choices=['folder', 'synthetic', 'IMNET'],
                   help='folder (IMNET is an alias) or in-memory synthetic data')
    g.add_argument('--train-path', default='',
                   help='training ImageFolder (default DATA/train), e.g. a pretraining pool whose classes are '
                        'those of DATA/val')
    g.add_argument('--eval-split', default='val', help='with --eval: the split folder to evaluate (e.g. test)')
    g.add_argument('--synthetic-classes', type=int, default=10, help='classes of the synthetic set')
    g.add_argument('--synthetic-train-size', type=int, default=640, help='synthetic training images')
    g.add_argument('--synthetic-val-size', type=int, default=200, help='synthetic validation images')
    g.add_argument('--input-size', default=224, type=int, help='image size')
    g.add_argument('--num_workers', default=min(4, max(0, (os.cpu_count() or 1) - 1)), type=int,
                   help='data-loading workers per process (default: cores - 1, at most 4)')
    g.add_argument('--threads', default=0, type=int,
                   help='torch threads per process (0: PyTorch\'s choice, or OMP_NUM_THREADS); give two jobs '
                        'on one machine half the cores each')
    g.add_argument('--skip-image-check', action='store_true',
                   help='do not open every training image before the first epoch (large sets); '
                        'evaluation images are always checked')
    g.add_argument('--pin-mem', action='store_true', default=True, help='pin host memory')
    g.add_argument('--no-pin-mem', action='store_false', dest='pin_mem', help='do not pin host memory')

    g = p.add_argument_group('model')
    g.add_argument('--model', default='vit_deit_small_patch16_224', type=str,
                   help='SDT2Net name: sdt2net_{tiny,small,base}_patch16_224, the official vit_deit_*, or '
                        'sdt2net_NAME[.TAG] for any timm VisionTransformer NAME (e.g. '
                        'sdt2net_vit_small_patch14_reg4_dinov2.lvd142m)')
    g.add_argument('--pretrained-file', default='',
                   help='with --pretrained: the weights from this local file instead of the hub, read as timm '
                        'reads them (pretrained_cfg_overlay=dict(file=...)): offline use of any timm ViT')
    g.add_argument('--mean', type=float, nargs=3, default=None,
                   help='input normalisation mean (default: what the model\'s pretrained weights expect)')
    g.add_argument('--std', type=float, nargs=3, default=None, help='input normalisation std (default: as --mean)')
    g.add_argument('--drop', type=float, default=0.0, help='dropout before the classifier')
    g.add_argument('--drop-path', type=float, default=0.1, help='stochastic depth rate')
    g.add_argument('--no-eab', action='store_true', help='switch off the efficient attention block')
    g.add_argument('--no-ftf', action='store_true', help='switch off the second-order fast token fusion head')
    g.add_argument('--eab-ratio', type=float, default=2.0, help='channel expansion of the shift-conv module')
    g.add_argument('--eab-groups', type=int, default=1, help='groups of the EAB 1x1 convs (e.g. heads: cheaper)')
    g.add_argument('--eab-shift', type=int, default=2, help='patches the EAB shifts by (official 2, ELAN 1)')
    g.add_argument('--eab-separate', action='store_true',
                   help='one shift-conv module each for q and k (default: one shared, as the official code)')
    g.add_argument('--pretrained', action='store_true', help='start from timm hub DeiT weights (online)')
    g.add_argument('--finetune', default='', help='start from the weights of a local DeiT or SDT2Net checkpoint '
                   '(weights only: the schedule is decided by the flags below)')
    g.add_argument('--model-ema', action='store_true', help='keep, evaluate and save an EMA of the weights')
    g.add_argument('--model-ema-decay', type=float, default=0.99996, help='EMA decay')

    g = p.add_argument_group('compression')
    g.add_argument('--target_flops', type=float, default=3.0, help='FLOPs budget in GFLOPs')
    g.add_argument('--flops-lambda', type=float, default=5.0,
                   help='lambda of the FLOPs penalty lambda * (GFLOPs - target)^2 (DiffRate: 5)')
    g.add_argument('--granularity', type=int, default=4, help='step between candidate kept counts')
    g.add_argument('--importance', default=None, choices=IMPORTANCES,
                   help='how patches are ranked before pruning: the class token\'s attention (class; default '
                        'with a class token) or the attention each patch receives (received; default without)')
    g.add_argument('--arch-lr', type=float, default=0.01, help='learning rate of the compression rates')
    g.add_argument('--arch-min-lr', type=float, default=0.01, help='final learning rate of the rates')
    g.add_argument('--search-mode', default='alternate', choices=['alternate', 'joint', 'arch', 'weights'],
                   help='alternate: weight and rate steps take turns; joint: both every step; arch: rates only '
                        '(frozen weights, DiffRate\'s search); weights: weights only (fixed schedule)')
    g.add_argument('--search-start', default='uniform', choices=SEARCH_STARTS,
                   help='where a new search starts: DiffRate\'s uniform distributions (about half the tokens '
                        'kept), nearly all mass on keeping every token, or the geometric merge schedule at '
                        '--search-start-flops (every stage at its own count)')
    g.add_argument('--search-start-flops', type=float, default=None,
                   help='GFLOPs of the geometric start (default: --target_flops)')
    g.add_argument('--anneal-epochs', type=float, default=0.0,
                   help='the budget slides linearly from the start\'s FLOPs to --target_flops over this many '
                        'epochs (0: the target from the first step, as DiffRate)')
    g.add_argument('--merge-rule', default='size-weighted', choices=MERGE_RULES,
                   help='size-weighted: merged token = size-weighted mean, sizes add up (ToMe); diffrate: '
                        'DiffRate\'s plain mean with sizes scaled by similarity (clamped to 1 in training)')
    g.add_argument('--warmup_compression_rate', action='store_true', help='no FLOPs penalty in the first epoch')
    g.add_argument('--load_compression_rate', action='store_true',
                   help='fix the schedule of --model at --target_flops from --compression-rate-file')
    g.add_argument('--compression-rate-file', default=DEFAULT_FILE, help='compression_rate.json to read')
    g.add_argument('--fixed-schedule', default='', choices=('',) + FIXED_SCHEDULES,
                   help='train or evaluate under a hand-set schedule: dense (every token), uniform (ToMe: the '
                        'same number merged in every block), uniform-prune (the same number pruned), geometric '
                        '(the same fraction merged in every block; reaches budgets below half the dense FLOPs), '
                        'geometric-prune, or backloaded (--dense-blocks blocks keep every token, then the same '
                        'fraction merged per block: the shape searches learn), at --target_flops')
    g.add_argument('--dense-blocks', type=int, default=4,
                   help='--fixed-schedule backloaded: blocks after the first that keep every token')
    g.add_argument('--schedule-variant', default='as-is', choices=SCHEDULE_VARIANTS,
                   help='use a fixed schedule as it is, or its prune-only / merge-only form (same token counts)')

    g = p.add_argument_group('optimisation (network weights)')
    g.add_argument('--batch-size', default=64, type=int, help='images per process and step')
    g.add_argument('--epochs', default=100, type=int, help='training epochs')
    g.add_argument('--opt', default='adamw', type=str, help='timm optimizer name')
    g.add_argument('--opt-eps', default=1e-8, type=float, help='optimizer epsilon')
    g.add_argument('--opt-betas', default=None, type=float, nargs='+', help='optimizer betas')
    g.add_argument('--momentum', type=float, default=0.9, help='SGD momentum')
    g.add_argument('--weight-decay', type=float, default=0.05, help='weight decay')
    g.add_argument('--clip-grad', type=float, default=None, help='gradient norm clipping (off by default)')
    g.add_argument('--sched', default='cosine', type=str, help='timm learning-rate schedule')
    g.add_argument('--lr', type=float, default=5e-4, help='learning rate for a total batch of 512 (scaled)')
    g.add_argument('--added-lr-scale', type=float, default=1.0,
                   help='learning rate of the EAB and FTF parameters relative to --lr (they start at zero in a '
                        'fine-tuned backbone; 1: one learning rate for all, as the official code)')
    g.add_argument('--lr-noise', type=float, nargs='+', default=None, help='learning-rate noise epochs')
    g.add_argument('--warmup-lr', type=float, default=1e-6, help='warm-up learning rate')
    g.add_argument('--min-lr', type=float, default=1e-5, help='final learning rate')
    g.add_argument('--decay-epochs', type=float, default=30, help='step schedule period')
    g.add_argument('--warmup-epochs', type=int, default=5, help='learning-rate warm-up epochs')
    g.add_argument('--cooldown-epochs', type=int, default=0, help='epochs at min-lr after the schedule')
    g.add_argument('--decay-rate', type=float, default=0.1, help='step schedule factor')

    g = p.add_argument_group('augmentation (DeiT defaults)')
    g.add_argument('--color-jitter', type=float, default=0.3, help='colour jitter factor')
    g.add_argument('--aa', type=str, default='rand-m9-mstd0.5-inc1', help='timm AutoAugment policy, "none" off')
    g.add_argument('--smoothing', type=float, default=0.1, help='label smoothing')
    g.add_argument('--train-interpolation', type=str, default='bicubic', help='resize interpolation')
    g.add_argument('--reprob', type=float, default=0.25, help='random erasing probability')
    g.add_argument('--remode', type=str, default='pixel', help='random erasing mode')
    g.add_argument('--recount', type=int, default=1, help='random erasing count')
    g.add_argument('--mixup', type=float, default=0.8, help='mixup alpha (0 = off)')
    g.add_argument('--cutmix', type=float, default=1.0, help='cutmix alpha (0 = off)')
    g.add_argument('--cutmix-minmax', type=float, nargs='+', default=None, help='cutmix ratio range')
    g.add_argument('--mixup-prob', type=float, default=1.0, help='probability of mixup or cutmix')
    g.add_argument('--mixup-switch-prob', type=float, default=0.5, help='probability of cutmix over mixup')
    g.add_argument('--mixup-mode', type=str, default='batch', choices=['batch', 'pair', 'elem'], help='mixup mode')

    g = p.add_argument_group('devices and distributed runs')
    g.add_argument('--device', default=None, help='cuda or cpu (default: cuda when available)')
    g.add_argument('--amp-dtype', default='bfloat16', choices=['bfloat16', 'float16'], help='GPU autocast type')
    g.add_argument('--no-amp', action='store_true', help='fp32 on GPU too')
    g.add_argument('--repeated-aug', action=argparse.BooleanOptionalAction, default=True,
                   help='repeated-augmentation sampler (RASampler) in distributed runs')
    g.add_argument('--dist-eval', action=argparse.BooleanOptionalAction, default=True,
                   help='shard evaluation over processes, each image counted once (else every process '
                        'evaluates everything)')
    g.add_argument('--seed', default=0, type=int, help='random seed (plus the process rank)')

    g = p.add_argument_group('run and output')
    g.add_argument('--output_dir', default='', help='where logs, checkpoints and schedules go')
    g.add_argument('--resume', default='', help='checkpoint to resume (or evaluate)')
    g.add_argument('--autoresume', action='store_true', help='resume from OUTPUT/checkpoint.pth if present')
    g.add_argument('--overwrite', action='store_true',
                   help='start a new run in an --output_dir that holds another one (its files are replaced)')
    g.add_argument('--start_epoch', default=0, type=int, help='first epoch')
    g.add_argument('--eval', action='store_true', help='evaluate only')
    g.add_argument('--print-freq', default=20, type=int, help='log every N steps')
    g.add_argument('--throughput-batch', type=int, default=32,
                   help='batch for the throughput measurement of --eval (0: skip it)')
    return p


# Every numeric option's range, by its argparse destination: (lowest, highest or None).
NUMERIC_RANGES = {
    'synthetic_classes': (2, None), 'synthetic_train_size': (1, None), 'synthetic_val_size': (1, None),
    'input_size': (32, 1024), 'num_workers': (0, 64), 'threads': (0, 1024), 'drop': (0, 1), 'drop_path': (0, 1),
    'eab_ratio': (0.01, 64), 'eab_groups': (1, 4096), 'eab_shift': (1, 64), 'model_ema_decay': (0, 1),
    'target_flops': (0, None), 'search_start_flops': (0, None), 'anneal_epochs': (0, None), 'flops_lambda': (0, None),
    'granularity': (1, None), 'dense_blocks': (0, 1024), 'arch_lr': (0, None), 'arch_min_lr': (0, None),
    'batch_size': (1, None),
    'epochs': (1, None), 'opt_eps': (0, None), 'opt_betas': (0, 1), 'momentum': (0, 1), 'weight_decay': (0, None),
    'clip_grad': (0, None), 'lr': (0, None), 'added_lr_scale': (0, 1000), 'lr_noise': (0, None),
    'warmup_lr': (0, None), 'min_lr': (0, None),
    'decay_epochs': (0, None), 'warmup_epochs': (0, None), 'cooldown_epochs': (0, None), 'decay_rate': (0, None),
    'color_jitter': (0, None), 'smoothing': (0, 1), 'reprob': (0, 1), 'recount': (1, 64), 'mixup': (0, None),
    'cutmix': (0, None), 'cutmix_minmax': (0, 1), 'mixup_prob': (0, 1), 'mixup_switch_prob': (0, 1),
    'seed': (0, 2 ** 32 - 1), 'mean': (-10, 10), 'std': (1e-6, 10), 'start_epoch': (0, None),
    'print_freq': (1, None), 'throughput_batch': (0, None),
}
UNDERSCORE_FLAGS = ('num_workers', 'target_flops', 'start_epoch')  # spelled with '_' on the command line


def validate_args(args, parser: argparse.ArgumentParser) -> None:
    """Every argument problem that can be seen before any work, one message each."""
    if args.data_set == 'IMNET':
        args.data_set = 'folder'
    if args.data_set == 'folder' and not args.data_path:
        parser.error('--data-path is required unless --data-set synthetic')
    if not timm.is_model(args.model) or not args.model.startswith(('sdt2net_', 'vit_deit_')):
        own = [n for n in timm.list_models(module='sdt2net') if n.startswith(('sdt2net_', 'vit_deit_'))]
        raise UserError(f'unknown model {args.model!r}; available: {", ".join(own)}, and sdt2net_NAME for any timm '
                        f'VisionTransformer NAME (python -c "import models, timm; print(timm.list_models(\'sdt2net_*\'))")')
    for dest, (low, high) in NUMERIC_RANGES.items():
        value = getattr(args, dest)
        for item in (value if isinstance(value, list) else [value]):
            if item is None:
                continue  # an option that is off
            if not math.isfinite(item) or item < low or (high is not None and item > high):
                flag = '--' + dest if dest in UNDERSCORE_FLAGS else '--' + dest.replace('_', '-')
                span = f'in [{low}, {high}]' if high is not None else f'at least {low}'
                parser.error(f'{flag} must be a finite number {span}, got {item}')
    args.mean, args.std = (list(given or default) for given, default in
                           zip((args.mean, args.std), models.input_normalization(args.model)))
    if args.pretrained_file and not args.pretrained:
        parser.error('--pretrained-file is where --pretrained reads the weights: add --pretrained')
    for name, values, counts in (('--cutmix-minmax', args.cutmix_minmax, (2,)), ('--opt-betas', args.opt_betas, (2,)),
                                 ('--lr-noise', args.lr_noise, (1, 2))):
        if values is not None and len(values) not in counts:
            parser.error(f'{name} takes {" or ".join(map(str, counts))} numbers, got {len(values)}')
    if args.cutmix_minmax is not None and not args.cutmix_minmax[0] < args.cutmix_minmax[1]:
        parser.error(f'--cutmix-minmax must be a range low < high, got {args.cutmix_minmax}')
    fixed = args.load_compression_rate or args.fixed_schedule
    if fixed and args.search_mode in ('joint', 'arch'):
        parser.error(f'--search-mode {args.search_mode} searches the rates, but the schedule is fixed '
                     f'({"--load_compression_rate" if args.load_compression_rate else "--fixed-schedule"})')
    if args.eval_split != 'val' and not args.eval:
        parser.error('--eval-split chooses what --eval measures; training runs select on val/')
    if args.eval and not (args.resume or args.finetune or args.pretrained):
        print('warning: evaluating randomly initialised weights (no --resume/--finetune/--pretrained)')


def make_precision(device: torch.device, args) -> Precision:
    if device.type != 'cuda' or args.no_amp:
        return Precision(device.type, None)
    dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
    return Precision(device.type, dtype, torch.amp.GradScaler('cuda') if dtype == torch.float16 else None)


def weight_param_groups(model: models.SDT2Net, weight_decay: float, lr: float, added_lr_scale: float = 1.0):
    """No weight decay for norms, biases, position embedding and class token (as DeiT); the
    parameters SDT2Net adds to the ViT (EAB, FTF) at lr * added_lr_scale, the others at lr."""
    arch = {id(p) for p in model.arch_parameters()}
    added = {id(p) for p in model.added_parameters()}
    skip = model.no_weight_decay()
    groups = {}  # (added, decays) -> parameters
    for name, param in model.named_parameters():
        if id(param) in arch or not param.requires_grad:
            continue
        key = (id(param) in added and added_lr_scale != 1.0, not (param.ndim <= 1 or name in skip))
        groups.setdefault(key, []).append(param)
    return [{'params': params, 'weight_decay': weight_decay if decays else 0.0,
             'lr': lr * added_lr_scale if scaled else lr}
            for (scaled, decays), params in sorted(groups.items())]


def set_trainable(model: models.SDT2Net, search_mode: str) -> None:
    """Freeze the parameter group the mode does not train (rates for weights, weights for arch)."""
    for param in model.arch_parameters():
        param.requires_grad_(search_mode != 'weights')
    for param in model.weight_parameters():
        param.requires_grad_(search_mode != 'arch')


def build_optimizers(model: models.SDT2Net, args, search_mode: str):
    """({'weights': ..., 'arch': ...}, matching schedulers) for the groups the mode trains."""
    optimizers, schedulers = {}, {}
    if search_mode != 'arch':
        lr = args.lr * args.batch_size * get_world_size() / 512.0
        optimizers['weights'] = create_optimizer_v2(
            weight_param_groups(model, args.weight_decay, lr, args.added_lr_scale), opt=args.opt, lr=lr,
            weight_decay=args.weight_decay, momentum=args.momentum, eps=args.opt_eps,
            **({'betas': args.opt_betas} if args.opt_betas else {}))
        schedulers['weights'], _ = create_scheduler_v2(
            optimizers['weights'], sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
            cooldown_epochs=args.cooldown_epochs, decay_rate=args.decay_rate, min_lr=args.min_lr,
            warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs, noise=args.lr_noise)
    if search_mode != 'weights':
        optimizers['arch'] = torch.optim.AdamW(model.arch_parameters(), lr=args.arch_lr, weight_decay=0.0)
        schedulers['arch'], _ = create_scheduler_v2(optimizers['arch'], sched='cosine', num_epochs=args.epochs,
                                                    min_lr=args.arch_min_lr, warmup_epochs=0)
    return optimizers, schedulers


def restore_training_state(state: Dict, optimizers, schedulers, precision, model_ema) -> Tuple[int, float]:
    """Optimizers, schedules, scaler, EMA and RNG of a resumed run; (first epoch, best top-1)."""
    for name, optimizer in optimizers.items():
        optimizer.load_state_dict(state['optimizers'][name])
        schedulers[name].load_state_dict(state['schedulers'][name])
    if precision.scaler is not None and state.get('scaler'):
        precision.scaler.load_state_dict(state['scaler'])
    if model_ema is not None and state.get('model_ema'):
        model_ema.module.load_state_dict(state['model_ema'])
    set_rng_state(state['rng'])
    return state['epoch'] + 1, state.get('best_acc', -math.inf)


def main(args, cleanup: contextlib.ExitStack) -> None:
    """One run; `cleanup` releases what it claims (the output folder's lock) however it ends."""
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = init_distributed(args.device)
    if not is_main_process():  # under torchrun the log is rank 0's; errors still reach stderr
        cleanup.enter_context(contextlib.redirect_stdout(cleanup.enter_context(open(os.devnull, 'w'))))
    seed_everything(args.seed)
    eval_split = args.eval_split if args.eval else 'val'
    val_set, class_names = build_dataset(False, args, split=eval_split)
    train_set = None if args.eval else build_dataset(True, args)[0]
    check_images(val_set, eval_split)  # every image opens, before any work depends on it
    if train_set is not None and not args.skip_image_check:
        check_images(train_set, 'train')
    num_classes = len(class_names)
    train_sampler, val_sampler = build_samplers(train_set, val_set, args)
    loader_kwargs = dict(num_workers=args.num_workers, pin_memory=args.pin_mem and device.type == 'cuda')
    val_loader = DataLoader(val_set, batch_size=args.batch_size, sampler=val_sampler, **loader_kwargs)

    # 1. weights: the architecture, then --pretrained/--finetune weights, then a resumed run's state
    model = create_model(args, num_classes)
    weights = load_weights(model, args.finetune) if args.finetune else None
    resume = args.resume
    checkpoint_path = os.path.join(args.output_dir, 'checkpoint.pth') if args.output_dir else ''
    if args.autoresume and checkpoint_path and os.path.isfile(checkpoint_path):
        resume = checkpoint_path
    resumed = load_checkpoint(resume) if resume else None
    if resumed is not None:
        load_resumed_model(model, resumed, resume, args, class_names)
        print(f'resumed from {resume} (epoch {resumed.get("epoch")})')
    elif not (args.eval or args.load_compression_rate or args.fixed_schedule):
        start_search(model, args.search_start, args.search_start_flops or args.target_flops)
    model.to(device)

    # 2. the schedule, decided once every weight is in place
    gflops_min, gflops_dense = models.flops_range(model.shape(), args.granularity)
    schedule, origin = resolve_schedule(args, model, resumed, weights)
    model.fix_schedule(schedule)
    search_mode = args.search_mode if schedule is None else 'weights'
    if schedule is None and not args.eval and not gflops_min <= args.target_flops <= gflops_dense:
        raise UserError(f'--target_flops {args.target_flops} is outside what {args.model} can reach at '
                        f'{args.input_size} px: [{gflops_min:.3f}, {gflops_dense:.3f}] GFLOPs')
    # the FLOPs an annealed budget starts from: the search's start, kept through resumes
    anneal_from = resumed.get('anneal_from') if resumed is not None else float(model.flops().detach()) / 1e9
    set_trainable(model, search_mode)
    n_parameters = sum(p.numel() for p in model.weight_parameters())
    print(f'model {args.model}: {n_parameters / 1e6:.2f} M parameters, {num_classes} classes, '
          f'GFLOPs dense {gflops_dense:.3f}, smallest {gflops_min:.3f}, target {args.target_flops}')
    print(f'schedule: {origin}; now {float(model.flops().detach()) / 1e9:.3f} GFLOPs, '
          f'prune {list(model.schedule().prune)}, merge {list(model.schedule().merge)}')

    optimizers, schedulers = build_optimizers(model, args, search_mode)
    precision = make_precision(device, args)
    model_ema = ModelEmaV3(model, decay=args.model_ema_decay) if args.model_ema and not args.eval else None
    start_epoch, best_acc = args.start_epoch, -math.inf  # the first evaluated epoch is the best so far, even at 0%
    if resumed is not None and not args.eval and 'optimizers' in resumed:
        try:
            start_epoch, best_acc = restore_training_state(resumed, optimizers, schedulers, precision, model_ema)
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as error:
            raise UserError(f'{resume}: cannot restore its training state ({error_line(error)})') from None
    if args.output_dir and is_main_process():  # only once the configuration is known to work
        # a training run continues its own folder; an evaluation never writes into a training run's
        own_checkpoint = resumed is not None and os.path.isdir(args.output_dir) and os.path.samefile(
            os.path.dirname(os.path.abspath(resume)), args.output_dir)
        continues = not args.eval and (args.autoresume or own_checkpoint)
        folder = OutputFolder(args.output_dir, continues=continues, overwrite=args.overwrite)
        cleanup.callback(folder.release)
        if resumed is None and os.path.isfile(os.path.join(args.output_dir, 'log.txt')):
            os.remove(os.path.join(args.output_dir, 'log.txt'))  # --overwrite: a new history
        atomic_write_text(json.dumps(vars(args), indent=2) + '\n', os.path.join(args.output_dir, 'args.json'))
    run_id = resumed.get('run_id') if resumed is not None and not args.eval else None
    run_id = run_id or f'{time.strftime("%Y%m%d-%H%M%S")}-{os.getpid()}'

    if args.eval:
        metrics = evaluate(model, val_loader, len(val_loader), num_classes, device, precision,
                           reduce=is_distributed() and args.dist_eval, print_freq=args.print_freq)
        report = describe_model(model, args, device, precision, gflops_dense)
        predictions = metrics.pop('predictions')
        report.update(metrics, class_names=class_names, split=eval_split, schedule_origin=origin)
        throughput = f'{report["throughput"]:.1f} img/s' if report['throughput'] else 'throughput not measured'
        print(f'top-1 {metrics["acc1"]:.2f}%  top-5 {metrics["acc5"]:.2f}%  kappa {metrics["kappa"]:.4f}  '
              f'GFLOPs {report["gflops"]:.3f} (fvcore {report["gflops_fvcore"]:.3f})  {throughput}  '
              f'on {metrics["num_images"]} images of {eval_split}/')
        print(f'kept tokens: prune {report["prune_kept_num"]}  merge {report["merge_kept_num"]}')
        if args.output_dir and is_main_process():
            atomic_write_text(json.dumps(report, indent=1) + '\n', os.path.join(args.output_dir, 'eval_metrics.json'))
            write_per_class(os.path.join(args.output_dir, 'per_class.csv'), metrics, class_names)
            if predictions is not None:
                write_predictions(os.path.join(args.output_dir, 'predictions.csv'), val_set, predictions)
        return

    if is_distributed():
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None)
    core = unwrap(model)
    mixup_active = args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None
    mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                     prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                     label_smoothing=args.smoothing, num_classes=num_classes) if mixup_active else None
    criterion = build_criterion(mixup_active, args.smoothing)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, sampler=train_sampler, drop_last=True,
                              **loader_kwargs)
    if len(train_loader) == 0:
        raise UserError(f'the training split has {len(train_set)} images, fewer than one batch of {args.batch_size}')

    print(f'{search_mode} training for {args.epochs} epochs from epoch {start_epoch}')
    start, filing = time.time(), None
    for epoch in range(start_epoch, args.epochs):
        train_sampler.set_epoch(epoch)
        for scheduler in schedulers.values():
            scheduler.step(epoch)
        warm = args.warmup_compression_rate and epoch == 0
        objective = SearchObjective(search_mode, args.target_flops, 0.0 if warm else args.flops_lambda,
                                    start_flops=anneal_from, anneal_steps=round(args.anneal_epochs * len(train_loader)),
                                    first_step=epoch * len(train_loader))
        train_stats = train_one_epoch(
            model, criterion=criterion, loader=train_loader, num_steps=len(train_loader), optimizers=optimizers,
            objective=objective, device=device, precision=precision, epoch=epoch, mixup_fn=mixup_fn,
            clip_grad=args.clip_grad, model_ema=model_ema, print_freq=args.print_freq)
        check_replicas_agree(core.rates.logits, 'rate parameters')  # before anything is saved
        if is_distributed() and is_main_process():
            print(f'rate parameters identical on all {get_world_size()} processes')
        reduce = is_distributed() and args.dist_eval
        test_stats = evaluate(core, val_loader, len(val_loader), num_classes, device, precision,
                              reduce=reduce, print_freq=args.print_freq)
        test_stats.pop('predictions')
        if model_ema is not None:
            ema_stats = evaluate(model_ema.module, val_loader, len(val_loader), num_classes, device, precision,
                                 reduce=reduce, print_freq=args.print_freq)
            test_stats.update(ema_acc1=ema_stats['acc1'], ema_kappa=ema_stats['kappa'])
        schedule, filing = core.schedule(), file_schedule(core, args.target_flops)
        is_best = test_stats['acc1'] > best_acc
        best_acc = max(best_acc, test_stats['acc1'])
        print(f'epoch {epoch}: top-1 {test_stats["acc1"]:.2f}% (best {best_acc:.2f}%), kappa '
              f'{test_stats["kappa"]:.4f}, GFLOPs {train_stats["gflops"]:.3f}, prune kept {list(schedule.prune)}, '
              f'merge kept {list(schedule.merge)}'
              + (f', EMA top-1 {test_stats["ema_acc1"]:.2f}%' if model_ema is not None else ''))
        if filing.note:
            print(filing.note)
        if args.output_dir and is_main_process():
            summary = {k: v for k, v in test_stats.items() if isinstance(v, float)}
            save_epoch(args, core, optimizers, schedulers, precision, model_ema, epoch, best_acc, is_best,
                       class_names, run_id, summary, anneal_from, filing)
            record = {'run_id': run_id, **{f'train_{k}': v for k, v in train_stats.items()},
                      **{f'test_{k}': v for k, v in test_stats.items()
                         if k != 'confusion_matrix' and not k.startswith('per_class')},
                      'epoch': epoch, 'n_parameters': n_parameters, 'prune_kept_num': list(schedule.prune),
                      'merge_kept_num': list(schedule.merge)}
            append_json_line(record, os.path.join(args.output_dir, 'log.txt'))
    filed = '' if filing is None else (f'; schedule filed under {filing.key:g} GFLOPs at '
                                       f'{filing.provenance["gflops"]:.4f} for --target_flops {args.target_flops}')
    print(f'training time {time.time() - start:.0f}s; outputs in {args.output_dir or "(no --output_dir)"}{filed}')


def describe_model(model: models.SDT2Net, args, device, precision, gflops_dense: float) -> Dict:
    """Schedule, FLOPs (analytic and fvcore's), parameters and throughput of the evaluated model."""
    schedule = model.schedule()
    gflops_fvcore = models.fvcore_flops(model, args.input_size, device) / 1e9
    throughput = measure_throughput(model, args.throughput_batch, args.input_size, device, precision) \
        if args.throughput_batch > 0 else None
    return {
        'model': args.model, 'target_flops': args.target_flops, 'input_size': args.input_size,
        'gflops': float(model.flops().detach()) / 1e9, 'gflops_fvcore': gflops_fvcore,
        'gflops_dense': gflops_dense, 'parameters': sum(p.numel() for p in model.weight_parameters()),
        'throughput': throughput, 'device': str(device), **schedule.as_dict(),
    }


def last_checkpoint(output_dir: str) -> str:
    """What a stopped run leaves to continue from, for its error line."""
    path = os.path.join(output_dir, 'checkpoint.pth') if output_dir else ''
    if not path or not os.path.isfile(path):
        return 'no epoch had finished, nothing was saved'
    try:
        with open(os.path.join(output_dir, 'log.txt')) as f:
            epoch = f' (epoch {json.loads(f.read().splitlines()[-1])["epoch"]})'
    except (OSError, ValueError, IndexError, KeyError, TypeError):
        epoch = ''
    return f'{path} holds the last finished epoch{epoch}; continue with --autoresume'


@error_boundary  # bad input and file errors; the failures of a run below come with their own advice
def run(argv=None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    try:
        validate_args(args, parser)
        with contextlib.ExitStack() as cleanup:
            main(args, cleanup)
    except UnreadableImageError as error:  # raised in a loader worker: its last line names the file
        raise UserError(error_line(error).split('; ')[-1]) from None
    except (NonFiniteError, ReplicasDisagreeError) as error:
        print(f'error: {error_line(error)}; stopped: {last_checkpoint(args.output_dir)} (lower --lr or '
              f'--arch-lr, or set --clip-grad)', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f'error: interrupted; {last_checkpoint(args.output_dir)}', file=sys.stderr)
        return 130
    except torch.OutOfMemoryError:
        print('error: out of memory; lower --batch-size (or --input-size)', file=sys.stderr)
        return 1
    finally:
        if is_distributed():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == '__main__':
    sys.exit(run())
