"""Comparing evaluations on the same images: paired bootstrap intervals, McNemar's exact test, and
summaries of runs repeated over seeds (the predictions.csv files of main.py --eval); any classifier
scored image by image on an ImageFolder split."""
import csv
import json
import math
import os
from typing import Callable, Dict, List, Tuple

import numpy as np
import torch

from datasets import batches, collect_images, list_classes
from utils import UserError


def read_predictions(path: str) -> Tuple[List[str], np.ndarray]:
    """(file names, correct [N] bool) of one predictions.csv, in its row order."""
    what = f'{path} is not a predictions.csv of main.py --eval (columns file,target,prediction)'
    try:
        with open(path, newline='') as f:
            rows = list(csv.DictReader(f))
    except OSError as error:
        raise UserError(f'cannot read {path}: {error.strerror}') from None
    except (UnicodeDecodeError, csv.Error):
        raise UserError(what) from None
    if not rows or not {'file', 'target', 'prediction'} <= set(rows[0]):
        raise UserError(what)
    for number, row in enumerate(rows, start=2):
        values = [row.get(key) for key in ('file', 'target', 'prediction')]
        if not all(values) or not all(v.strip().lstrip('-').isdigit() for v in values[1:]):
            raise UserError(f'{path}, line {number}: not a row of file, target and prediction (integers)')
    return [r['file'] for r in rows], np.array([int(r['target']) == int(r['prediction']) for r in rows])


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


def difference_text(result: Dict[str, float]) -> str:
    """'+0.53 [+0.07, +0.98]': a paired_comparison's difference (points) and its 95% interval."""
    return f'{result["difference"]:+.2f} [{result["ci_low"]:+.2f}, {result["ci_high"]:+.2f}]'


def paired_differences(correct: Dict[str, np.ndarray], pairs) -> Dict[str, Dict[str, float]]:
    """{'A - B': paired_comparison(correct[A], correct[B])} for every (A, B) in pairs, in order."""
    return {f'{a} - {b}': paired_comparison(correct[a], correct[b]) for a, b in pairs}


def read_paired_predictions(path_a: str, path_b: str) -> Tuple[np.ndarray, np.ndarray]:
    """correct [N] of two predictions.csv files of the same images in the same order."""
    files_a, correct_a = read_predictions(path_a)
    files_b, correct_b = read_predictions(path_b)
    if files_a != files_b:
        raise UserError(f'{path_a} and {path_b} are not evaluations of the same images in the same order')
    return correct_a, correct_b


def compare_files(path_a: str, path_b: str, resamples: int = 10000) -> Dict[str, float]:
    return paired_comparison(*read_paired_predictions(path_a, path_b), resamples)


def summarise(runs: Dict[str, Dict[int, str]], name: str, reference: str = '') -> Dict:
    """Top-1 per seed, mean and sd; against `reference`: each seed's paired difference (95% CI)
    and the difference of the seed-averaged correctness per image (95% bootstrap CI)."""
    seeds = sorted(runs[name])
    metrics = [json.load(open(os.path.join(runs[name][s], 'eval_metrics.json'))) for s in seeds]
    top1 = [m['acc1'] for m in metrics]
    mean = sum(top1) / len(top1)
    sd = math.sqrt(sum((a - mean) ** 2 for a in top1) / (len(top1) - 1)) if len(top1) > 1 else float('nan')
    summary = {'name': name, 'seeds': seeds, 'top1': top1, 'mean': mean, 'sd': sd, 'metrics': metrics[0],
               'per_seed': [], 'pooled': None}
    shared = [s for s in seeds if reference and reference != name and s in runs.get(reference, {})]
    if not shared:
        return summary
    ours, theirs = [], []
    for s in shared:
        a, b = read_paired_predictions(*(os.path.join(runs[n][s], 'predictions.csv') for n in (name, reference)))
        summary['per_seed'].append(paired_comparison(a, b, 2000))
        ours.append(a), theirs.append(b)
    summary['pooled'] = {**seed_averaged_difference(ours, theirs), 'seeds': shared}
    return summary


def seed_averaged_difference(ours: List[np.ndarray], theirs: List[np.ndarray]) -> Dict[str, float]:
    """The per-image difference of the correctness [N] averaged over runs (seeds) A and B, in
    points, with a 95% bootstrap interval; a single run on one side is compared with every run."""
    pooled = np.mean([a.astype(float) for a in ours], axis=0) - np.mean([b.astype(float) for b in theirs], axis=0)
    low, high = bootstrap_interval(pooled)
    return {'difference': 100 * pooled.mean(), 'ci_low': 100 * low, 'ci_high': 100 * high}


def correct_on_split(classify: Callable[[torch.Tensor], torch.Tensor], split_dir: str, class_names: List[str],
                     transform, batch_size: int = 64) -> Tuple[List[str], np.ndarray]:
    """(image paths, correct [N] bool) of a classifier (images [B, 3, H, W] -> logits [B, classes])
    on an ImageFolder split with the classifier's classes, in sorted path order."""
    classes = list_classes(split_dir)
    if classes != list(class_names):
        raise UserError(f'{split_dir} holds other classes than the model')
    paths = collect_images([split_dir])
    names, correct = [], []
    with torch.no_grad():
        for read, images in batches(paths, transform, batch_size):
            predictions = classify(images).argmax(-1).tolist()
            correct += [classes.index(os.path.basename(os.path.dirname(path))) == p for path, p in zip(read, predictions)]
            names += read
    return names, np.array(correct)
