"""Export a checkpoint of main.py for use outside training.

    python export.py release OUT/model_best.pth sdt2net_nwpu.pth
    python export.py onnx OUT/model_best.pth sdt2net_nwpu.onnx --check DATA/test --max-images 256

`release` writes a weights-only file (weights, schedule, class names, the arguments that define
the network; no optimizer state) that factory.load_trained_model, predict.py, `main.py --eval
--finetune FILE` and `main.py --finetune FILE` read, and timm.create_model(..., checkpoint_path=FILE)
loads the weights of. `onnx` writes the evaluation model under its fixed schedule as an ONNX graph
(static token counts, dynamic batch; class names, schedule and preprocessing in its metadata) and,
with --check, runs it in onnxruntime on real images against PyTorch.
"""
import argparse
import importlib.util
import json
import os
import sys
from typing import Dict, Iterable, Optional

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import models
from datasets import build_transform
from factory import MODEL_ARGUMENTS, load_trained_model, schedule_entry
from predict import batches, collect_images
from utils import ArgumentParser, UserError, atomic_torch_save, atomic_write, error_boundary, load_checkpoint

ONNX_OPSET = 18
PARITY_TOLERANCE = 1e-4  # largest |logit| difference between onnxruntime and PyTorch per image
OUTLIER_SHARE = 0.01  # share of images allowed beyond it (near-ties of the token selection)


def release(checkpoint_path: str, out_path: str) -> Dict:
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


def export_onnx(model: models.SDT2Net, path: str, input_size: int, metadata: Optional[Dict[str, str]] = None,
                optimize: bool = True) -> None:
    """Trace the evaluation model (its fixed schedule becomes static token counts) to ONNX with a
    dynamic batch dimension; `metadata` goes into the model's metadata_props. `optimize` runs
    onnxscript's graph optimiser (a quarter of the nodes; most of the export time)."""
    import onnx  # optional dependencies: requirements-export.txt
    model = model.eval()
    example = torch.zeros(2, 3, input_size, input_size)
    batch = torch.export.Dim('batch', min=1, max=4096)
    try:
        program = torch.onnx.export(model, (example,), dynamo=True, opset_version=ONNX_OPSET, verbose=False,
                                    optimize=optimize, input_names=['images'], output_names=['logits'],
                                    dynamic_shapes={'x': {0: batch}})
    except Exception as error:  # the exporter's own error types; their summary names the operation
        lines = str(error).strip().splitlines()
        cause = next((line for line in lines if line.startswith('<class')), lines[0] if lines else repr(error))
        raise UserError(f'ONNX export failed: {cause}') from None
    graph = program.model_proto
    for key, value in (metadata or {}).items():
        graph.metadata_props.add(key=key, value=value)
    atomic_write(lambda tmp: onnx.save_model(graph, tmp), path)


def onnx_runner(path: str, threads: int = 0):
    """onnxruntime's CPU runner of an ONNX file, quiet (it would note every node it cannot fold);
    threads: intra-op threads, 0 = onnxruntime's default."""
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(path, options, providers=['CPUExecutionProvider'])


def compare_with_onnxruntime(model: models.SDT2Net, onnx_path: str, images: Iterable[torch.Tensor]) -> Dict[str, float]:
    """Run both on the same batches: per image, the largest logit difference against PyTorch
    running the graph's own operations (models.tracing) and against the eager model; top-1 agreement."""
    runner = onnx_runner(onnx_path)
    traced_diff, eager_diff, agree = [], [], []
    for batch in images:
        runtime = torch.from_numpy(runner.run(None, {'images': batch.numpy()})[0])
        with torch.no_grad():
            eager = model(batch)
            with models.export_numerics():
                traced = model(batch)
        traced_diff += (runtime - traced).abs().amax(dim=-1).tolist()
        eager_diff += (runtime - eager).abs().amax(dim=-1).tolist()
        agree += (runtime.argmax(-1) == eager.argmax(-1)).tolist()
    traced = torch.tensor(traced_diff)
    return {'images': len(agree), 'max_abs_diff_traced': traced.max().item(),
            'median_abs_diff_traced': traced.median().item(),
            'images_over_tolerance': int((traced > PARITY_TOLERANCE).sum()),
            'max_abs_diff_eager': max(eager_diff), 'top1_agreement': sum(agree) / len(agree)}


def onnx_command(args) -> int:
    model, run_args = load_trained_model(args.checkpoint)
    schedule = model.schedule()
    metadata = {
        'class_names': json.dumps(model.class_names),
        'input_size': str(run_args.input_size),
        'preprocessing': 'RGB, resize shorter side to input_size / 0.875 (bicubic), centre crop, '
                         'scale to [0, 1], normalise with mean/std',
        'mean': json.dumps(list(IMAGENET_DEFAULT_MEAN)),  # datasets.build_transform's
        'std': json.dumps(list(IMAGENET_DEFAULT_STD)),
        'schedule': json.dumps({'prune': list(schedule.prune), 'merge': list(schedule.merge)}),
        'gflops': f'{float(model.flops()) / 1e9:.4f}',
        'source': os.path.abspath(args.checkpoint),
    }
    export_onnx(model, args.out, run_args.input_size, metadata, optimize=not args.no_optimize)
    print(f'wrote {args.out} ({os.path.getsize(args.out) / 1e6:.1f} MB, opset {ONNX_OPSET}, dynamic batch)')
    if not args.check:
        return 0
    transform = build_transform(False, run_args)
    paths = collect_images(args.check)[:args.max_images]
    images = (batch for _, batch in batches(paths, transform, args.batch_size))  # read as compared
    result = compare_with_onnxruntime(model, args.out, images)
    print(json.dumps(result))
    # NOTE the hard token selection makes the logits discontinuous where two tokens' importances
    # nearly tie: rounding differences of 1e-6 between runtimes can keep another token there, as
    # 1e-6 of input noise does in eager mode (3 of 4500 NWPU test images, docs/benchmark.md).
    # A systematic mismatch shows on most images; a few such images are expected.
    if result['images_over_tolerance'] > OUTLIER_SHARE * result['images'] or result['top1_agreement'] < 0.99:
        raise UserError(f'onnxruntime differs from PyTorch by more than {PARITY_TOLERANCE:g} in the logits on '
                        f'{result["images_over_tolerance"]} of {result["images"]} images (top-1 agreement '
                        f'{result["top1_agreement"]:.3f}); the file is written but should not be trusted')
    return 0


def release_command(args) -> int:
    content = release(args.checkpoint, args.out)
    size = os.path.getsize(args.out) / 1e6
    print(f'wrote {args.out} ({size:.1f} MB: weights, schedule, {len(content["class_names"])} class names, '
          f'model arguments)')
    return 0


@error_boundary
def main(argv=None) -> int:
    parser = ArgumentParser(prog='export.py', description=__doc__.splitlines()[0],
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    commands = parser.add_subparsers(dest='command', required=True)
    rel = commands.add_parser('release', help='weights-only release file', description=release.__doc__,
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    rel.add_argument('checkpoint', help='checkpoint.pth or model_best.pth written by main.py')
    rel.add_argument('out', help='the release file to write (.pth)')
    onnx_parser = commands.add_parser('onnx', help='ONNX graph of the evaluation model',
                                      description=export_onnx.__doc__,
                                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    onnx_parser.add_argument('checkpoint', help='checkpoint.pth, model_best.pth or a release file')
    onnx_parser.add_argument('out', help='the .onnx file to write')
    onnx_parser.add_argument('--check', nargs='*', default=[], metavar='IMAGES',
                             help='image files or folders to compare onnxruntime with PyTorch on')
    onnx_parser.add_argument('--max-images', type=int, default=256, help='images of --check used at most')
    onnx_parser.add_argument('--batch-size', type=int, default=32, help='images per batch of --check')
    onnx_parser.add_argument('--no-optimize', action='store_true',
                             help="skip onnxscript's graph optimiser: about 3x faster export, a larger graph")
    args = parser.parse_args(argv)
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        raise UserError(f'cannot write {args.out}: the folder {folder} does not exist')
    if args.command == 'onnx':
        missing = [name for name in ('onnx', 'onnxruntime', 'onnxscript') if importlib.util.find_spec(name) is None]
        if missing:
            raise UserError(f'ONNX export needs the optional packages of requirements-export.txt '
                            f'({", ".join(missing)} missing): pip install -r requirements-export.txt')
        return onnx_command(args)
    return release_command(args)


if __name__ == '__main__':
    sys.exit(main())
