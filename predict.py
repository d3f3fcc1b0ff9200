"""Classify new images with a trained checkpoint of main.py, or with its exported ONNX graph.

    python predict.py OUT/model_best.pth IMAGE_OR_FOLDER [...] [--out predictions.csv] [--topk 5]
    python predict.py OUT/model_best.pth DATA/test --out test.jsonl --explain explain/
    python predict.py model.onnx IMAGE_OR_FOLDER [...]          # onnxruntime, same rows

Inputs are image files, folders (searched recursively) or .txt files listing image paths; rows
come out in sorted path order. Class names, input size, normalisation and schedule come from the
checkpoint (or the graph's metadata). Files that cannot be read are reported on one line each and
skipped.
"""
import argparse
import csv
import io
import json
import os
import sys
from typing import Dict, List

import torch

from datasets import batches, build_transform, collect_images, eval_transform
from utils import ArgumentParser, UserError, atomic_write_text, error_boundary
from workflow.onnx_export import OnnxClassifier, require_packages
from workflow.runs import load_trained_model


@error_boundary
def main(argv=None) -> int:
    parser = ArgumentParser(prog='predict.py', description=__doc__.splitlines()[0],
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('checkpoint', help='checkpoint.pth, model_best.pth or a release file of main.py, or a .onnx '
                                           'graph of export.py onnx')
    parser.add_argument('inputs', nargs='+', help='image files, folders (recursive) or .txt lists of paths')
    parser.add_argument('--out', default='', help='write rows here: .csv or .jsonl (default: CSV on stdout)')
    parser.add_argument('--topk', type=int, default=5, help='classes per image, most probable first')
    parser.add_argument('--batch-size', type=int, default=32, help='images per forward pass')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='cpu or cuda')
    parser.add_argument('--explain', default='', metavar='DIR',
                        help='also write, per image, its token groups at four depths (as visualize.py)')
    args = parser.parse_args(argv)
    for name, value in (('--topk', args.topk), ('--batch-size', args.batch_size)):
        if value < 1:
            parser.error(f'{name} must be at least 1, got {value}')
    if args.checkpoint.endswith('.onnx'):  # the deployed graph: onnxruntime on the CPU
        if args.explain:
            parser.error('--explain needs a checkpoint (the token groups come from the PyTorch model)')
        require_packages(f'running {args.checkpoint}', ('onnx', 'onnxruntime'))
        model, device = OnnxClassifier(args.checkpoint), torch.device('cpu')
        transform = eval_transform(model.input_size, model.mean, model.std)
    else:
        model, run_args = load_trained_model(args.checkpoint)
        device = torch.device(args.device)
        model.to(device)
        transform = build_transform(False, run_args)
    paths = collect_images(args.inputs)
    topk = min(args.topk, len(model.class_names))
    rows = []
    for names, images in batches(paths, transform, args.batch_size):
        with torch.no_grad():
            probs = model(images.to(device)).float().softmax(-1).cpu()
        values, indices = probs.topk(topk, dim=-1)
        for name, v, i in zip(names, values.tolist(), indices.tolist()):
            rows.append({'file': name, 'classes': [model.class_names[c] for c in i], 'probs': v})
        if args.explain:
            explain(model, images, names, args.explain)
        print(f'predicted {len(rows)} of {len(paths)} images', file=sys.stderr)
    if not rows:
        raise UserError(f'none of the {len(paths)} images could be read; nothing written')
    write_rows(rows, args.out, topk)
    return 0


def explain(model, images: torch.Tensor, names: List[str], out_dir: str) -> None:
    from workflow.figures import save, token_groups_figure
    for image, name in zip(images, names):
        fig = token_groups_figure(model, image[None].to(next(model.parameters()).device), [os.path.basename(name)])
        save(fig, out_dir, os.path.splitext(os.path.basename(name))[0] + '_tokens.png')


def write_rows(rows: List[Dict], out: str, topk: int) -> None:
    """CSV (file, top1, top1_prob, ..., topK, topK_prob) or JSON lines ({file, classes, probs}),
    written atomically (or CSV on stdout without `out`)."""
    if out.endswith('.jsonl'):
        atomic_write_text(''.join(json.dumps(row) + '\n' for row in rows), out)
        return
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(['file'] + [h for k in range(1, topk + 1) for h in (f'top{k}', f'top{k}_prob')])
    for row in rows:
        writer.writerow([row['file']] + [x for c, p in zip(row['classes'], row['probs']) for x in (c, f'{p:.4f}')])
    if out:
        atomic_write_text(text.getvalue(), out)
    else:
        sys.stdout.write(text.getvalue())


if __name__ == '__main__':
    sys.exit(main())
