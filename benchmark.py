"""Side-by-side speed benchmarks of SDT2Net; prints a table and the ratios the project targets.

    python benchmark.py                      # this machine's device, 224 px, batch 32
    python benchmark.py --device cuda --batch-size 256 --amp bf16

Each measurement: warm-up runs, then the median of `--repeats` timed runs (synchronised on GPU).
Rows are measured interleaved (round-robin) so that background load hits all of them alike.
See docs/benchmark.md for what each step should show, predicted against measured.
"""
import argparse
import contextlib
import copy
import dataclasses
import importlib.util
import json
import os
import statistics
import tempfile
import warnings
from typing import Callable, Dict, Iterator, Tuple
from unittest import mock

import timm
import torch

import models  # registers the SDT2Net models with timm
from losses import flops_penalty
from models import sdt2net as sdt2net_module
from models.ftf import add_ridge, weighted_covariance
from models.sqrtm import eigh_sqrtm, pade_sqrtm
from utils import ArgumentParser, UserError, atomic_write_text, error_boundary
from workflow.schedule_file import load_schedule
from workflow.timing import inference, measure, measure_rounds, paired_ratio, retain_freed_memory

ROOT = os.path.dirname(os.path.abspath(__file__))
REFERENCE = os.path.join(ROOT, '..', 'shared', 'reference', 'diffrate_compression_rate.json')
# DiffRate's published ViT-S-DeiT schedule at 2.9 GFLOPs, for machines without the reference file.
VIT_S_2_9 = models.Schedule([197, 196, 190, 168, 150, 139, 129, 117, 99, 78, 58, 3],
                            [197, 194, 176, 156, 141, 133, 121, 107, 88, 64, 56, 3]).running_min()
FULL = models.Schedule.dense(12, 196)


def vit_s_2_9_schedule() -> models.Schedule:
    """ViT-S-DeiT at 2.9 GFLOPs, from the reference file if present."""
    if os.path.exists(REFERENCE):
        return load_schedule(REFERENCE, 'sdt2net_small_patch16_224', 2.9)
    return VIT_S_2_9


def sdt2net_small(eab: bool, ftf: bool, schedule: models.Schedule, device) -> models.SDT2Net:
    model = timm.create_model('sdt2net_small_patch16_224', eab=eab, ftf=ftf, num_classes=1000).to(device)
    model.fix_schedule(schedule)
    return model


@error_boundary
def main(argv=None) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--batch-size', type=int, default=32, help='batch of the training and root parts')
    parser.add_argument('--inference-batches', type=int, nargs='+', default=[1, 32],
                        help='batch sizes of the inference part')
    parser.add_argument('--train-batch-size', type=int, default=None, help='default: --batch-size')
    parser.add_argument('--amp', default='none', choices=['none', 'bf16'], help='autocast dtype (GPU)')
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--parts', nargs='+', default=['inference', 'train', 'sqrt'],
                        choices=['inference', 'train', 'sqrt', 'onnx', 'vits', 'int8'],
                        help='which benchmarks to run (onnx: onnxruntime against PyTorch, needs requirements-export.txt; '
                             'vits: compression on ViT-B/16 and DINOv2-S/14, eager and in onnxruntime; int8: '
                             'onnxruntime\'s int8 quantization of dense and compressed graphs)')
    parser.add_argument('--int8-settings', nargs='+', default=sorted(INT8_SETTINGS), choices=sorted(INT8_SETTINGS),
                        help='models of the int8 part')
    parser.add_argument('--int8-threads', type=int, nargs='+', default=[1, 0],
                        help='onnxruntime threads of the int8 part (0: every core)')
    parser.add_argument('--int8-profile', action='store_true',
                        help='int8 part: onnxruntime\'s profile of each compressed graph, time per operator type')
    parser.add_argument('--vit-settings', nargs='+', default=sorted(VIT_SETTINGS), choices=sorted(VIT_SETTINGS),
                        help='models of the vits part')
    parser.add_argument('--vit-input-size', type=int, default=224, help='image size of the vits part')
    parser.add_argument('--onnx-settings', nargs='+', default=['small', 'tiny'], choices=sorted(ONNX_SETTINGS),
                        help='deployments of the onnx part: DeiT-S at 224 px, DeiT-Tiny at 112 px')
    parser.add_argument('--onnx-input-size', type=int, default=0, help='image size of the onnx part (0: the setting\'s)')
    parser.add_argument('--onnx-no-optimize', action='store_true',
                        help="export without onnxscript's graph optimiser (export.py onnx --no-optimize)")
    parser.add_argument('--json', default='', help='also write the results here')
    parser.add_argument('--fresh-allocator', action='store_true',
                        help="keep glibc's start-up memory thresholds (see retain_freed_memory)")
    args = parser.parse_args(argv)
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        raise UserError(f'--device {args.device}: CUDA is not available on this machine')
    if not args.fresh_allocator and not retain_freed_memory():
        print('note: not glibc, memory thresholds left as they are')
    device = torch.device(args.device)
    torch.manual_seed(0)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.amp == 'bf16' \
        else contextlib.nullcontext
    images = torch.randn(args.batch_size, 3, 224, 224, device=device)
    results: Dict[str, float] = {}

    if 'inference' in args.parts:
        results.update(benchmark_inference(args, device, autocast))
    if 'train' in args.parts:
        results.update(benchmark_training(args, device, autocast, images))
    if 'sqrt' in args.parts:
        results.update(benchmark_sqrt(args, device))
    if 'int8' in args.parts:
        results.update(benchmark_int8(args))
    if 'onnx' in args.parts:
        results.update(benchmark_onnx(args))
    if 'vits' in args.parts:
        results.update(benchmark_vits(args))
    if args.json:
        atomic_write_text(json.dumps({'device': str(device), 'batch_size': args.batch_size, 'amp': args.amp,
                                      **results}, indent=1), args.json)


def benchmark_inference(args, device, autocast) -> Dict[str, float]:
    """Compression speedup against the FLOPs ratio, full keep against timm's DeiT-S, and the full
    model (EAB+FTF) at DeiT-S's FLOPs against DeiT-S (the same work should take the same time),
    at every batch size of --inference-batches."""
    schedule = vit_s_2_9_schedule()
    timm_net = timm.create_model('deit_small_patch16_224').to(device)
    timm_gflops = models.fvcore_flops(timm_net, 224, device) / 1e9
    nets = {
        'timm deit_small_patch16_224': timm_net,
        'sdt2net-S full keep (EAB/FTF off)': sdt2net_small(False, False, FULL, device),
        'sdt2net-S ViT-S-DeiT 2.9 (EAB/FTF off)': sdt2net_small(False, False, schedule, device),
        'sdt2net-S full keep (EAB+FTF)': sdt2net_small(True, True, FULL, device),
        'sdt2net-S ViT-S-DeiT 2.9 (EAB+FTF)': sdt2net_small(True, True, schedule, device),
    }
    at_deit_flops = models.uniform_schedule(nets['sdt2net-S full keep (EAB+FTF)'].shape(), timm_gflops)  # ToMe
    nets['sdt2net-S at DeiT-S FLOPs (EAB+FTF)'] = sdt2net_small(True, True, at_deit_flops, device)
    flops = {name: float(net.eval().flops()) if isinstance(net, models.SDT2Net) else timm_gflops * 1e9
             for name, net in nets.items()}
    results = {}
    for batch in args.inference_batches:
        results.update(inference_ratios(args, device, autocast, nets, flops, batch))
    return results


def inference_ratios(args, device, autocast, nets: Dict[str, torch.nn.Module], flops: Dict[str, float],
                     batch: int) -> Dict[str, float]:
    """The inference table and its ratios at one batch size."""
    results = {}
    images = torch.randn(batch, 3, 224, 224, device=device)
    timm_gflops = flops['timm deit_small_patch16_224'] / 1e9
    seconds = measure({name: inference(net.eval(), images, autocast) for name, net in nets.items()}, device,
                      args.warmup, args.repeats)
    print(f'\ninference, batch {batch}, 224 px, {device.type}, amp {args.amp}')
    print(f'{"model":42s} {"GFLOPs":>8s} {"img/s":>9s}')
    for name, s in seconds.items():
        print(f'{name:42s} {flops[name] / 1e9:8.3f} {batch / s:9.1f}')
        results[f'img/s {name} batch {batch}'] = batch / s
    for variant in ('EAB/FTF off', 'EAB+FTF'):
        dense, compressed = f'sdt2net-S full keep ({variant})', f'sdt2net-S ViT-S-DeiT 2.9 ({variant})'
        speedup = seconds[dense] / seconds[compressed]
        flops_ratio = flops[dense] / flops[compressed]
        results[f'speedup/flops-ratio {variant} batch {batch}'] = speedup / flops_ratio
        print(f'speedup at ViT-S-DeiT 2.9 ({variant}): {speedup:.2f}x, FLOPs ratio {flops_ratio:.2f}x, '
              f'speedup / FLOPs ratio = {speedup / flops_ratio:.2f} (target >= 0.90)')
    ratio = seconds['timm deit_small_patch16_224'] / seconds['sdt2net-S full keep (EAB/FTF off)']
    results[f'full-keep throughput / timm batch {batch}'] = ratio
    print(f'full keep (EAB/FTF off) throughput / timm DeiT-S: {ratio:.2f} (target >= 0.95)')
    same_work = seconds['timm deit_small_patch16_224'] / seconds['sdt2net-S at DeiT-S FLOPs (EAB+FTF)']
    results[f'EAB+FTF at DeiT-S FLOPs throughput / timm batch {batch}'] = same_work
    print(f'SDT2Net-S (EAB+FTF) at {flops["sdt2net-S at DeiT-S FLOPs (EAB+FTF)"] / 1e9:.2f} GFLOPs throughput / '
          f'timm DeiT-S at {timm_gflops:.2f}: {same_work:.2f} (target >= 0.90)')
    return results


# The deployments the onnx part compares: our model, timm's DeiT of the same width, image size.
ONNX_SETTINGS = {'small': ('sdt2net_small_patch16_224', 'deit_small_patch16_224', 224),
                 'tiny': ('sdt2net_tiny_patch16_224', 'deit_tiny_patch16_224', 112)}


# The compressed EAB/FTF-off model exported with token_ops_as_slices(): what its schedule's token
# counts alone run at, the floor that no cheaper ranking, gathering or merging can go below.
FLOOR = 'floor EAB/FTF off'


@contextlib.contextmanager
def token_ops_as_slices() -> Iterator[None]:
    """While active, every compression keeps the first tokens: no importance, ranking, gathers,
    merging or sizes (so no proportional attention either), the same token counts."""
    def first_tokens(x, state, importance, prune_kept, merge_kept, keep_masks=None, merge_rule=None):
        kept = min(prune_kept, merge_kept, state.alive)
        return x[:, :kept], dataclasses.replace(state, alive=kept, derived={})
    with mock.patch.object(sdt2net_module, 'compress', first_tokens):
        yield


def onnx_nets(setting: str, size: int) -> Tuple[Dict[str, torch.nn.Module], Dict[str, float]]:
    """The exported models of one setting and their GFLOPs: timm's DeiT, ours dense and compressed
    with EAB/FTF off and on, and ours with EAB+FTF at the DeiT's FLOPs. Compressed: DiffRate's
    ViT-S-DeiT 2.9 schedule for DeiT-S at 224 px, else the same-fraction merge schedule at half
    the dense FLOPs."""
    ours, deit, _ = ONNX_SETTINGS[setting]
    nets: Dict[str, torch.nn.Module] = {'timm': timm.create_model(deit, img_size=size, num_classes=1000).eval()}
    for eab_ftf in (False, True):
        variant = 'EAB+FTF' if eab_ftf else 'EAB/FTF off'
        model = timm.create_model(ours, img_size=size, num_classes=1000, eab=eab_ftf, ftf=eab_ftf).eval()
        shape = model.shape()
        dense = models.Schedule.dense(shape.depth, shape.num_patches, shape.num_prefix)
        compressed = vit_s_2_9_schedule() if (setting, size) == ('small', 224) else \
            models.uniform_schedule(shape, dense.flops(shape) / 2e9, 'merge', 'ratio')
        for name, schedule in (('dense', dense), ('compressed', compressed)):
            net = copy.deepcopy(model)
            net.fix_schedule(schedule)
            nets[f'{name} {variant}'] = net
    deit_gflops = float(nets['dense EAB/FTF off'].flops()) / 1e9  # = timm's DeiT (analytic = fvcore)
    same = copy.deepcopy(nets['dense EAB+FTF'])
    shape = same.shape()
    try:  # ToMe's schedule where it reaches, else the same fraction
        same.fix_schedule(models.uniform_schedule(shape, deit_gflops, 'merge', 'count'))
    except ValueError:
        same.fix_schedule(models.uniform_schedule(shape, deit_gflops, 'merge', 'ratio'))
    nets['EAB+FTF at DeiT FLOPs'] = same
    nets[FLOOR] = copy.deepcopy(nets['compressed EAB/FTF off'])
    gflops = {name: deit_gflops if name == 'timm' else float(net.flops()) / 1e9 for name, net in nets.items()}
    return nets, gflops


def benchmark_onnx(args) -> Dict[str, float]:
    """The deployed runtime: every model of each --onnx-settings exported as export.py does and
    timed in onnxruntime, interleaved, at every batch size of --inference-batches; the compressed
    graphs' speedup over the dense ones against their FLOPs ratio, the EAB+FTF model at the DeiT's
    FLOPs against timm's exported DeiT, and onnxruntime against eager PyTorch."""
    import onnxruntime
    from workflow.onnx_export import export_onnx, onnx_runner
    results = {}
    for setting in args.onnx_settings:
        size = args.onnx_input_size or ONNX_SETTINGS[setting][2]
        nets, gflops = onnx_nets(setting, size)
        with tempfile.TemporaryDirectory() as folder:
            runners = {}
            for name, net in nets.items():
                path = os.path.join(folder, name.replace(' ', '_').replace('/', '-') + '.onnx')
                with token_ops_as_slices() if name == FLOOR else contextlib.nullcontext():
                    export_onnx(net, path, size, optimize=not args.onnx_no_optimize)
                runners[name] = onnx_runner(path, threads=torch.get_num_threads(), spin=False)  # timed in turn
            print(f'\nonnxruntime {onnxruntime.__version__}, {setting} at {size} px, CPU, {torch.get_num_threads()} '
                  f'threads, graphs {"not " if args.onnx_no_optimize else ""}optimised')
            for batch in args.inference_batches:
                images = torch.randn(batch, 3, size, size)
                feed = {'images': images.numpy()}
                cases = {name: (lambda r=runner: r.run(None, feed)) for name, runner in runners.items()}
                cases['eager compressed EAB+FTF'] = inference(nets['compressed EAB+FTF'], images)
                rounds = measure_rounds(cases, torch.device('cpu'), args.warmup, args.repeats)
                seconds = {name: statistics.median(t) for name, t in rounds.items()}

                def report(key: str, label: str, numerator: str, denominator: str, scale: float = 1.0) -> None:
                    """Print and keep the seconds of numerator / those of denominator / scale, paired
                    within rounds."""
                    middle, low, high = (r / scale for r in paired_ratio(rounds[numerator], rounds[denominator]))
                    results[f'onnx {setting} {key} batch {batch}'] = middle
                    print(f'  {label}: {middle:.2f} (quartiles over rounds {low:.2f}-{high:.2f})')
                print(f'batch {batch} (img/s: medians of {args.repeats} rounds; ratios: medians of the ratios '
                      f'within rounds):')
                for name in runners:
                    print(f'  {name:26s} {gflops[name]:7.3f} GFLOPs {batch / seconds[name]:9.1f} img/s')
                    results[f'onnx {setting} img/s {name} batch {batch}'] = batch / seconds[name]
                for variant in ('EAB/FTF off', 'EAB+FTF'):
                    flops_ratio = gflops[f'dense {variant}'] / gflops[f'compressed {variant}']
                    report(f'speedup/flops-ratio {variant}', f'compressed ({variant}), speedup over dense / '
                           f'{flops_ratio:.2f}x fewer FLOPs', f'dense {variant}', f'compressed {variant}', flops_ratio)
                report('floor speedup/flops-ratio', 'the same token counts with the token operations as slices '
                       '(floor, EAB/FTF off), speedup / FLOPs ratio', 'dense EAB/FTF off', FLOOR,
                       gflops['dense EAB/FTF off'] / gflops[FLOOR])
                report('EAB+FTF at DeiT FLOPs / timm', f'EAB+FTF at {gflops["EAB+FTF at DeiT FLOPs"]:.3f} GFLOPs, '
                       f'throughput / timm DeiT at {gflops["timm"]:.3f}', 'timm', 'EAB+FTF at DeiT FLOPs')
                report('onnxruntime over eager', 'onnxruntime over eager PyTorch (compressed EAB+FTF)',
                       'eager compressed EAB+FTF', 'compressed EAB+FTF')
    return results


# Deployments of the int8 part: (model, image size, compressed schedule). DeiT-S at 224 px under
# DiffRate's 2.9-GFLOPs schedule; DeiT-Tiny at 112 px under the learned schedule of the pretrained
# backbone (compression_rate.json, 0.176 GFLOPs); ViT-B/16 at 224 px under the same-fraction merge
# schedule at half its FLOPs. EAB and FTF off: the models of those schedules.
INT8_SETTINGS = {'small': ('sdt2net_small_patch16_224', 224, 'diffrate 2.9'),
                 'tiny': ('sdt2net_tiny_patch16_224', 112, 'learned 0.176'),
                 'vit_b16': ('sdt2net_vit_base_patch16_224', 224, 'geometric half')}


def int8_nets(setting: str) -> Tuple[Dict[str, torch.nn.Module], int]:
    """The dense and the compressed model of an int8 setting (random weights: timing only)."""
    name, size, rule = INT8_SETTINGS[setting]
    model = timm.create_model(name, img_size=size, num_classes=45, eab=False, ftf=False).eval()
    shape = model.shape()
    dense = models.Schedule.dense(shape.depth, shape.num_patches, shape.num_prefix)
    if rule == 'diffrate 2.9':
        compressed = vit_s_2_9_schedule()
    elif rule == 'learned 0.176':
        compressed = load_schedule(os.path.join(ROOT, 'compression_rate.json'), name, 0.176)
    else:
        compressed = models.uniform_schedule(shape, dense.flops(shape) / 2e9, 'merge', 'ratio')
    nets = {}
    for label, schedule in (('dense', dense), ('compressed', compressed)):
        net = copy.deepcopy(model)
        net.fix_schedule(schedule)
        nets[label] = net
    return nets, size


def benchmark_int8(args) -> Dict[str, float]:
    """Dense and compressed graphs in fp32 and in int8 (dynamic and static, as export.py onnx
    --quantize writes them), timed interleaved in onnxruntime at every --inference-batches and
    --int8-threads; throughput relative to the dense fp32 graph, and file sizes."""
    from workflow.onnx_export import export_onnx, onnx_runner
    from workflow.quantize import QUANTIZATIONS, quantize
    results = {}
    for setting in args.int8_settings:
        nets, size = int8_nets(setting)
        with tempfile.TemporaryDirectory() as folder:
            paths, gflops = {}, {}
            for label, net in nets.items():
                paths[f'{label} fp32'] = os.path.join(folder, f'{label}.onnx')
                export_onnx(net, paths[f'{label} fp32'], size, optimize=not args.onnx_no_optimize)
                gflops[label] = float(net.flops()) / 1e9
                for mode in QUANTIZATIONS:
                    paths[f'{label} int8 {mode}'] = os.path.join(folder, f'{label}_{mode}.onnx')
                    calibration = [torch.randn(8, 3, size, size) for _ in range(4)] if mode == 'static' else None
                    quantize(paths[f'{label} fp32'], paths[f'{label} int8 {mode}'], mode, {}, calibration)
            print(f'\nint8: {setting} ({INT8_SETTINGS[setting][0]}, {size} px, compressed: '
                  f'{INT8_SETTINGS[setting][2]}, {gflops["compressed"]:.3f} of {gflops["dense"]:.3f} GFLOPs)')
            for name, path in paths.items():
                megabytes = os.path.getsize(path) / 1e6
                results[f'int8 {setting} MB {name}'] = megabytes
                print(f'  {name:26s} {megabytes:7.1f} MB')
            if args.int8_profile:
                for name in ('compressed fp32', 'compressed int8 dynamic', 'compressed int8 static'):
                    shares = operator_shares(paths[name], size, max(args.inference_batches), args.repeats)
                    results.update({f'int8 {setting} profile {name} {op}': share for op, share in shares.items()})
                    print(f'  profile of {name}, batch {max(args.inference_batches)}, one thread: ' +
                          ', '.join(f'{op} {100 * share:.0f}%' for op, share in list(shares.items())[:8]))
            for threads in args.int8_threads:
                runners = {name: onnx_runner(path, threads=threads, spin=False) for name, path in paths.items()}
                for batch in args.inference_batches:
                    feed = {'images': torch.randn(batch, 3, size, size).numpy()}
                    cases = {name: (lambda r=runner: r.run(None, feed)) for name, runner in runners.items()}
                    rounds = measure_rounds(cases, torch.device('cpu'), args.warmup, args.repeats)
                    print(f'  {threads or "all"} thread(s), batch {batch}: throughput / dense fp32 '
                          f'(median of the ratios within {args.repeats} rounds, quartiles)')
                    for name in runners:
                        middle, low, high = paired_ratio(rounds['dense fp32'], rounds[name])
                        results[f'int8 {setting} {name} threads {threads} batch {batch}'] = middle
                        images_per_second = batch / statistics.median(rounds[name])
                        print(f'    {name:26s} {middle:5.2f}x ({low:.2f}-{high:.2f})  {images_per_second:8.1f} img/s')
    return results


def operator_shares(path: str, size: int, batch: int, runs: int) -> Dict[str, float]:
    """Share of the time of `runs` runs of a graph (one thread) spent in each operator type,
    largest first, from onnxruntime's own profile."""
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as folder:
        options.profile_file_prefix = os.path.join(folder, 'profile')
        runner = onnxruntime.InferenceSession(path, options, providers=['CPUExecutionProvider'])
        feed = {'images': torch.randn(batch, 3, size, size).numpy()}
        for _ in range(runs):
            runner.run(None, feed)
        with open(runner.end_profiling()) as f:
            events = json.load(f)
    per_op: Dict[str, float] = {}
    for event in events:
        if event.get('cat') == 'Node' and event['name'].endswith('_kernel_time'):
            op = event['args']['op_name']
            per_op[op] = per_op.get(op, 0.0) + event['dur']
    total = sum(per_op.values())
    return {op: t / total for op, t in sorted(per_op.items(), key=lambda item: -item[1])}


# The ViTs people start from (random weights: timing only), as `sdt2net_<timm name>` builds them.
VIT_SETTINGS = {'vit_b16': 'vit_base_patch16_224', 'dinov2_s14': 'vit_small_patch14_reg4_dinov2'}


def benchmark_vits(args) -> Dict[str, float]:
    """Compression on the ViTs of --vit-settings (EAB/FTF off, the same-fraction merge schedule
    at half the dense FLOPs): the compressed model's speedup over the dense one divided by the
    FLOPs ratio, eager PyTorch and onnxruntime, the four timed interleaved at every batch of
    --inference-batches. Without the optional ONNX packages, eager only."""
    have_onnx = all(importlib.util.find_spec(m) for m in ('onnx', 'onnxruntime', 'onnxscript'))
    results, size = {}, args.vit_input_size
    for setting in args.vit_settings:
        model = timm.create_model(f'sdt2net_{VIT_SETTINGS[setting]}', img_size=size, num_classes=1000, eab=False,
                                  ftf=False).eval()
        shape = model.shape()
        dense = models.Schedule.dense(shape.depth, shape.num_patches, shape.num_prefix)
        nets = {'dense': model, 'compressed': copy.deepcopy(model)}
        nets['dense'].fix_schedule(dense)
        nets['compressed'].fix_schedule(models.uniform_schedule(shape, dense.flops(shape) / 2e9, 'merge', 'ratio'))
        gflops = {name: float(net.flops()) / 1e9 for name, net in nets.items()}
        flops_ratio = gflops['dense'] / gflops['compressed']
        with tempfile.TemporaryDirectory() as folder:
            runners = {}
            if have_onnx:
                from workflow.onnx_export import export_onnx, onnx_runner
                for name, net in nets.items():
                    export_onnx(net, os.path.join(folder, f'{name}.onnx'), size, optimize=not args.onnx_no_optimize)
                    runners[name] = onnx_runner(os.path.join(folder, f'{name}.onnx'), threads=torch.get_num_threads(),
                                                spin=False)
            print(f'\n{VIT_SETTINGS[setting]} at {size} px ({shape.num_patches} patches, {shape.num_prefix} prefix '
                  f'tokens), CPU, {torch.get_num_threads()} threads: dense {gflops["dense"]:.2f} GFLOPs, compressed '
                  f'{gflops["compressed"]:.2f} (kept after each block {list(nets["compressed"].schedule().merge)})')
            for batch in args.inference_batches:
                images = torch.randn(batch, 3, size, size)
                cases = {f'eager {name}': inference(net, images) for name, net in nets.items()}
                cases.update({f'onnx {name}': (lambda r=runner: r.run(None, {'images': images.numpy()}))
                              for name, runner in runners.items()})
                rounds = measure_rounds(cases, torch.device('cpu'), args.warmup, args.repeats)
                print(f'batch {batch}: ' + ', '.join(f'{name} {batch / statistics.median(t):.1f} img/s'
                                                     for name, t in rounds.items()))
                for runtime in ('eager', 'onnx') if runners else ('eager',):
                    middle, low, high = (r / flops_ratio for r in paired_ratio(rounds[f'{runtime} dense'],
                                                                               rounds[f'{runtime} compressed']))
                    results[f'vits {setting} {runtime} speedup/flops-ratio batch {batch}'] = middle
                    print(f'  {runtime}: speedup / {flops_ratio:.2f}x fewer FLOPs = {middle:.2f} (quartiles over '
                          f'rounds {low:.2f}-{high:.2f}; target >= 0.90 at batch 32)')
    return results


def benchmark_training(args, device, autocast, images) -> Dict[str, float]:
    """One step (forward, backward, both optimizers) against timm's DeiT-S step."""
    results = {}
    batch = args.train_batch_size or args.batch_size
    x, y = images[:batch], torch.randint(0, 1000, (batch,), device=device)
    timm_net = timm.create_model('deit_small_patch16_224', drop_path_rate=0.0).to(device).train()
    ours = timm.create_model('sdt2net_small_patch16_224', eab=False, ftf=False, num_classes=1000).to(device).train()
    timm_opt = torch.optim.AdamW(timm_net.parameters(), lr=1e-5)

    def timm_step():
        with autocast():
            loss = torch.nn.functional.cross_entropy(timm_net(x), y)
        timm_opt.zero_grad()
        loss.backward()
        timm_opt.step()

    our_step = sdt2net_training_step(ours, autocast, x, y, target_flops=3.0)
    step = measure({'timm': timm_step, 'ours': our_step}, device, args.warmup, args.repeats)
    ratio = step['ours'] / step['timm']
    results['train step / timm'] = ratio
    print(f'\ntraining step, batch {batch}: timm DeiT-S {step["timm"] * 1e3:.0f} ms, SDT2Net-S (EAB/FTF off, '
          f'learned rates) {step["ours"] * 1e3:.0f} ms: {ratio:.2f}x (target <= 1.25)')
    if device.type == 'cuda':
        results.update(count_synchronisations(autocast, x, y))
    return results


def sdt2net_training_step(model: models.SDT2Net, autocast, x: torch.Tensor, y: torch.Tensor,
                          target_flops: float) -> Callable[[], None]:
    """One step as a search runs it: forward, FLOPs penalty, backward, weight and rate optimizers."""
    weight_opt = torch.optim.AdamW(model.weight_parameters(), lr=1e-5)
    arch_opt = torch.optim.AdamW(model.arch_parameters(), lr=1e-3)

    def step():
        with autocast():
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss = loss + flops_penalty(model.flops(), target_flops=target_flops, flops_lambda=5.0)
        weight_opt.zero_grad()
        arch_opt.zero_grad()
        loss.backward()
        weight_opt.step()
        arch_opt.step()
    return step


def count_synchronisations(autocast, x: torch.Tensor, y: torch.Tensor) -> Dict[str, float]:
    """CUDA synchronisations of one search step and one fine-tuning step of SDT2Net-S with EAB+FTF."""
    model = timm.create_model('sdt2net_small_patch16_224', num_classes=1000).to(x.device).train()
    step = sdt2net_training_step(model, autocast, x, y, target_flops=5.7)
    step()  # optimizer state is created on the first step
    search = cuda_synchronisations(step)
    model.fix_schedule(vit_s_2_9_schedule())
    step()  # a fixed schedule's kept counts are read once, then cached
    fine_tuning = cuda_synchronisations(step)
    print(f'CUDA synchronisations per step (torch.cuda.set_sync_debug_mode, EAB+FTF): search {search} '
          f'(expected 1: the kept counts), fine-tuning {fine_tuning} (expected 0)')
    return {'cuda syncs per search step': search, 'cuda syncs per fine-tuning step': fine_tuning}


def cuda_synchronisations(step: Callable[[], None]) -> int:
    """Host-device synchronisations during one call of `step`, as PyTorch's sync debug mode reports them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        torch.cuda.set_sync_debug_mode('warn')
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode('default')
    return sum('synchroniz' in str(w.message) for w in caught)


def benchmark_sqrt(args, device) -> Dict[str, float]:
    """Pade square root against an eigendecomposition, forward + backward, 64 x 48x48 fp32."""
    results = {}
    a = root_benchmark_matrices(device).requires_grad_(True)

    # A dense upstream gradient, as the head's classifier sends back; `.sum()` would send an
    # expanded tensor of ones, which makes eigh's backward slower than in training (docs).
    upstream = torch.randn(a.shape, device=device)

    def backward(fn):
        def run():
            torch.autograd.backward(fn(a), upstream)
            a.grad = None
        return run
    roots = measure({'pade': backward(pade_sqrtm), 'eigh': backward(eigh_sqrtm)}, device,
                    args.warmup, args.repeats * 20)  # 13 ms a round: many rounds are cheap
    error, gradient_error = root_error(a.detach()), root_gradient_error(a.detach())
    ratio = roots['eigh'] / roots['pade']
    results['pade speedup over eigh'] = ratio
    results['pade max relative error'] = error
    results['pade max relative gradient error'] = gradient_error
    print(f'\nmatrix sqrt 64 x 48x48 fp32, fwd+bwd: Pade {roots["pade"] * 1e3:.2f} ms, eigh {roots["eigh"] * 1e3:.2f} ms: '
          f'{ratio:.1f}x faster (target >= 3), max relative error {error:.1e} (target < 1e-3), '
          f'gradient {gradient_error:.1e}')
    # Covariances as the FTF head builds them (ReLU features of N tokens plus its ridge) have
    # eigenvalues down to the ridge (rank-deficient for N <= 48), where the approximant is least
    # exact. Their gradients are not compared: the exact root's blows up as 1 / sqrt(eigenvalue).
    torch.manual_seed(1)  # the same covariances whatever was drawn before (errors vary by draw, docs)
    for tokens in (196, 49):
        features = torch.relu(torch.randn(64, tokens, 48, device=device) + 0.3 * torch.randn(64, 1, 48, device=device))
        covariance = add_ridge(weighted_covariance(features, torch.ones(64, tokens, 1, device=device)))
        error = root_error(covariance)
        results[f'pade max relative error, {tokens}-token covariance'] = error
        print(f'  on covariances of {tokens} tokens: max relative error {error:.1e}')
    return results


def root_benchmark_matrices(device) -> torch.Tensor:
    """The root benchmark's input, [64, 48, 48] fp32: well-conditioned Wishart matrices plus 0.1 I.

    Seeded, so that they are the same whichever parts ran before (and in experiments/).
    """
    torch.manual_seed(0)
    a = torch.randn(64, 4 * 48, 48, device=device)
    return a.transpose(1, 2) @ a / (4 * 48) + 0.1 * torch.eye(48, device=device)


def relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest relative Frobenius error over the batch, x and reference: [B, d, d]."""
    return float((torch.linalg.matrix_norm(x.double() - reference) / torch.linalg.matrix_norm(reference)).max())


@torch.no_grad()
def root_error(a: torch.Tensor) -> float:
    """Error of the Pade root of a: [B, d, d] fp32 against a float64 eigendecomposition."""
    return relative_error(pade_sqrtm(a), eigh_sqrtm(a.double()))


def root_gradient_error(a: torch.Tensor) -> float:
    """Error of the Pade root's gradient (random upstream gradient, symmetric directions) against
    a float64 eigendecomposition's, a: [B, d, d] fp32."""
    upstream = torch.randn(a.shape, dtype=torch.float64, device=a.device)
    ours, exact = a.clone().requires_grad_(True), a.double().requires_grad_(True)
    grad, = torch.autograd.grad((pade_sqrtm(ours) * upstream.float()).sum(), ours)
    reference, = torch.autograd.grad((eigh_sqrtm(exact) * upstream).sum(), exact)
    return relative_error(grad, (reference + reference.transpose(1, 2)) / 2)


if __name__ == '__main__':
    main()
