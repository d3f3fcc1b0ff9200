"""Paired comparison of two evaluations of the same images (the predictions.csv of main.py --eval).

    python compare.py RUN_A/eval/predictions.csv RUN_B/eval/predictions.csv [--json OUT.json]

Prints both top-1 accuracies, their difference A - B with a 95% confidence interval from a
paired bootstrap over images, and the exact McNemar test of the images on which they disagree.
"""
import argparse
import csv
import json
import math
import sys
from typing import Dict, List, Tuple

import numpy as np

from utils import ArgumentParser, UserError, error_boundary


def read_predictions(path: str) -> Tuple[List[str], np.ndarray]:
    """(file names, correct [N] bool) of one predictions.csv, in its row order."""
    try:
        with open(path, newline='') as f:
            rows = list(csv.DictReader(f))
    except OSError as error:
        raise UserError(f'cannot read {path}: {error.strerror}') from None
    if not rows or not {'file', 'target', 'prediction'} <= set(rows[0]):
        raise UserError(f'{path} is not a predictions.csv of main.py --eval (columns file,target,prediction)')
    return [r['file'] for r in rows], np.array([r['target'] == r['prediction'] for r in rows])


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: the discordant pairs split as Binomial(n, 1/2)."""
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def bootstrap_interval(difference: np.ndarray, resamples: int = 10000, seed: int = 0) -> Tuple[float, float]:
    """95% bootstrap interval of the mean of per-image differences [N] (images resampled)."""
    n = len(difference)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 1000):  # resample images, 1000 draws at a time
        draws = rng.integers(0, n, size=(min(1000, resamples - start), n))
        means[start:start + len(draws)] = difference[draws].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def paired_comparison(correct_a: np.ndarray, correct_b: np.ndarray, resamples: int = 10000,
                      seed: int = 0) -> Dict[str, float]:
    """Accuracies (%), their difference A - B with a 95% paired-bootstrap interval, McNemar's p."""
    n = len(correct_a)
    difference = correct_a.astype(np.float64) - correct_b.astype(np.float64)  # [N] in {-1, 0, 1}
    low, high = bootstrap_interval(difference, resamples, seed)
    only_a, only_b = int((correct_a & ~correct_b).sum()), int((~correct_a & correct_b).sum())
    return {'images': n, 'acc_a': 100 * correct_a.mean(), 'acc_b': 100 * correct_b.mean(),
            'difference': 100 * difference.mean(), 'ci_low': 100 * low, 'ci_high': 100 * high,
            'only_a_correct': only_a, 'only_b_correct': only_b, 'mcnemar_p': mcnemar_exact(only_a, only_b)}


def read_paired_predictions(path_a: str, path_b: str) -> Tuple[np.ndarray, np.ndarray]:
    """correct [N] of two predictions.csv files of the same images in the same order."""
    files_a, correct_a = read_predictions(path_a)
    files_b, correct_b = read_predictions(path_b)
    if files_a != files_b:
        raise UserError(f'{path_a} and {path_b} are not evaluations of the same images in the same order')
    return correct_a, correct_b


def compare_files(path_a: str, path_b: str, resamples: int = 10000) -> Dict[str, float]:
    return paired_comparison(*read_paired_predictions(path_a, path_b), resamples)


@error_boundary
def main(argv=None) -> int:
    parser = ArgumentParser(prog='compare.py', description=__doc__.splitlines()[0],
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('a', help='predictions.csv of evaluation A')
    parser.add_argument('b', help='predictions.csv of evaluation B (same images)')
    parser.add_argument('--resamples', type=int, default=10000, help='bootstrap resamples')
    parser.add_argument('--json', default='', help='also write the result here')
    args = parser.parse_args(argv)
    result = compare_files(args.a, args.b, args.resamples)
    print(f'{result["images"]} images: A {result["acc_a"]:.2f}%, B {result["acc_b"]:.2f}%, A - B '
          f'{result["difference"]:+.2f} points, 95% CI [{result["ci_low"]:+.2f}, {result["ci_high"]:+.2f}] '
          f'(paired bootstrap); only A right on {result["only_a_correct"]}, only B on '
          f'{result["only_b_correct"]}, McNemar p = {result["mcnemar_p"]:.3g}')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
