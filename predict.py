"""Classify new images with a trained checkpoint of main.py.

    python predict.py OUT/model_best.pth IMAGE_OR_FOLDER [...] [--out predictions.csv] [--topk 5]
    python predict.py OUT/model_best.pth DATA/test --out test.jsonl --explain explain/

Inputs are image files, folders (searched recursively) or .txt files listing image paths; rows
come out in sorted path order. Class names, input size, normalisation and schedule come from the
checkpoint. Files that cannot be read are reported on one line each and skipped.
"""
import argparse
import csv
import json
import os
import sys
from typing import Iterator, List, Tuple

import torch

from datasets import IMAGE_EXTENSIONS, UnreadableImageError, build_transform, load_rgb
from factory import load_trained_model
from utils import ArgumentParser, UserError, error_boundary


def collect_images(inputs: List[str]) -> List[str]:
    """Image paths of files, folders (recursive) and .txt lists, sorted, without duplicates."""
    paths = set()
    for item in inputs:
        if os.path.isdir(item):
            for root, dirs, files in os.walk(item):
                dirs[:] = [d for d in dirs if not d.startswith('.')]
                paths.update(os.path.join(root, f) for f in files
                             if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith('.'))
        elif item.lower().endswith('.txt') and os.path.isfile(item):
            with open(item) as f:
                paths.update(line.strip() for line in f if line.strip())
        elif os.path.isfile(item):
            paths.add(item)
        else:
            raise UserError(f'no such image, folder or list: {item}')
    if not paths:
        raise UserError(f'no images found in {", ".join(inputs)}')
    return sorted(paths)


def batches(paths: List[str], transform, batch_size: int) -> Iterator[Tuple[List[str], torch.Tensor]]:
    """(readable paths, images [b, 3, H, W]) per batch; unreadable files are reported and skipped."""
    names, images = [], []
    for path in paths:
        try:
            images.append(transform(load_rgb(path)))
            names.append(path)
        except UnreadableImageError as error:
            print(f'skipped: {error}', file=sys.stderr)
        if len(images) == batch_size:
            yield names, torch.stack(images)
            names, images = [], []
    if images:
        yield names, torch.stack(images)


@error_boundary
def main(argv=None) -> int:
    parser = ArgumentParser(prog='predict.py', description=__doc__.splitlines()[0],
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('checkpoint', help='checkpoint.pth or model_best.pth written by main.py')
    parser.add_argument('inputs', nargs='+', help='image files, folders (recursive) or .txt lists of paths')
    parser.add_argument('--out', default='', help='write rows here: .csv or .jsonl (default: CSV on stdout)')
    parser.add_argument('--topk', type=int, default=5, help='classes per image, most probable first')
    parser.add_argument('--batch-size', type=int, default=32, help='images per forward pass')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='cpu or cuda')
    parser.add_argument('--explain', default='', metavar='DIR',
                        help='also write, per image, its token groups at four depths (as visualize.py)')
    args = parser.parse_args(argv)
    model, run_args = load_trained_model(args.checkpoint)
    device = torch.device(args.device)
    model.to(device)
    paths = collect_images(args.inputs)
    transform = build_transform(False, run_args)
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
    write_rows(rows, args.out, topk)
    return 0


def explain(model, images: torch.Tensor, names: List[str], out_dir: str) -> None:
    from visualize import save, token_groups_figure
    for image, name in zip(images, names):
        fig = token_groups_figure(model, image[None].to(next(model.parameters()).device), [os.path.basename(name)])
        save(fig, out_dir, os.path.splitext(os.path.basename(name))[0] + '_tokens.png')


def write_rows(rows, out: str, topk: int) -> None:
    """CSV (file, top1, top1_prob, ..., topK, topK_prob) or JSON lines ({file, classes, probs})."""
    if out.endswith('.jsonl'):
        with open(out, 'w') as f:
            for row in rows:
                f.write(json.dumps(row) + '\n')
        return
    f = open(out, 'w', newline='') if out else sys.stdout
    writer = csv.writer(f)
    writer.writerow(['file'] + [h for k in range(1, topk + 1) for h in (f'top{k}', f'top{k}_prob')])
    for row in rows:
        writer.writerow([row['file']] + [x for c, p in zip(row['classes'], row['probs']) for x in (c, f'{p:.4f}')])
    if out:
        f.close()


if __name__ == '__main__':
    sys.exit(main())
