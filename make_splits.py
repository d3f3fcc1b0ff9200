"""Make train/ and val/ splits of a class-folder scene dataset at a training ratio.

NWPU-RESISC45, AID and UC-Merced ship as one folder per class without splits; papers train on
10%/20% (NWPU), 20%/50% (AID) or 80% (UCM) of each class and test on the rest. The split is
stratified per class, seeded and reproducible; files are hard-linked (default), symlinked or copied.

    python make_splits.py --source NWPU-RESISC45 --dest nwpu_10 --train-ratio 0.1 --seed 0
"""
import argparse
import json
import os
import random
import shutil
import sys
from typing import Dict, List

from datasets import IMAGE_EXTENSIONS, list_classes
from utils import ArgumentParser, UserError, atomic_write_text, error_boundary


def scan_classes(source: str) -> Dict[str, List[str]]:
    """{class: sorted image file names}; every class folder must hold images."""
    if not os.path.isdir(source):
        raise UserError(f'--source {source} is not a folder')
    return {c: sorted(f for f in os.listdir(os.path.join(source, c)) if f.lower().endswith(IMAGE_EXTENSIONS))
            for c in list_classes(source)}


def split_class(files: List[str], train_ratio: float, rng: random.Random) -> List[List[str]]:
    """[train, val] of one class: round(ratio * n) training images, at least one in each split."""
    if len(files) < 2:
        raise UserError(f'a class needs at least 2 images to split, found {files}')
    shuffled = list(files)
    rng.shuffle(shuffled)
    n_train = min(max(1, round(train_ratio * len(files))), len(files) - 1)
    return [sorted(shuffled[:n_train]), sorted(shuffled[n_train:])]


def place(src: str, dst: str, mode: str) -> None:
    if mode == 'copy':
        shutil.copy2(src, dst)
    elif mode == 'symlink':
        os.symlink(os.path.abspath(src), dst)
    else:
        try:
            os.link(src, dst)
        except OSError:  # another file system: fall back to a copy
            shutil.copy2(src, dst)


def make_splits(source: str, dest: str, train_ratio: float, seed: int, mode: str) -> Dict[str, Dict[str, int]]:
    if not 0 < train_ratio < 1:
        raise UserError(f'--train-ratio must lie in (0, 1), got {train_ratio}')
    if os.path.exists(dest) and os.listdir(dest):
        raise UserError(f'--dest {dest} exists and is not empty; choose a new folder')
    images = scan_classes(source)
    rng = random.Random(seed)
    counts = {}
    plan = {c: split_class(files, train_ratio, rng) for c, files in images.items()}  # all checks first
    for name, (train, val) in plan.items():
        for split, files in (('train', train), ('val', val)):
            os.makedirs(os.path.join(dest, split, name), exist_ok=True)
            for f in files:
                place(os.path.join(source, name, f), os.path.join(dest, split, name, f), mode)
        counts[name] = {'train': len(train), 'val': len(val)}
    atomic_write_text(json.dumps({'source': os.path.abspath(source), 'train_ratio': train_ratio, 'seed': seed,
                                  'files': plan}, indent=1) + '\n', os.path.join(dest, 'split.json'))
    return counts


@error_boundary
def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--source', required=True, help='dataset root with one folder per class')
    parser.add_argument('--dest', required=True, help='new folder for train/ and val/')
    parser.add_argument('--train-ratio', type=float, required=True, help='fraction of each class for training')
    parser.add_argument('--seed', type=int, default=0, help='random seed of the split')
    parser.add_argument('--mode', default='hardlink', choices=['hardlink', 'symlink', 'copy'], help='how files are placed')
    args = parser.parse_args(argv)
    counts = make_splits(args.source, args.dest, args.train_ratio, args.seed, args.mode)
    train, val = sum(c['train'] for c in counts.values()), sum(c['val'] for c in counts.values())
    print(f'{len(counts)} classes: {train} training and {val} validation images in {args.dest} (split.json lists them)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
