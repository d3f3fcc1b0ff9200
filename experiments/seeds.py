"""Runs repeated over seeds (folders NAME_seedN with eval/eval_metrics.json and predictions.csv):
top-1 per seed, mean +- sd, and paired differences against a reference row on the same images."""
import glob
import json
import math
import os
import re
import sys
from typing import Dict, List

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from compare import bootstrap_interval, paired_comparison, read_paired_predictions  # noqa: E402


def seed_runs(folder: str) -> Dict[str, Dict[int, str]]:
    """{name: {seed: evaluation folder}} of the finished runs NAME_seedN under folder."""
    runs: Dict[str, Dict[int, str]] = {}
    for path in sorted(glob.glob(os.path.join(folder, '*_seed*', 'eval', 'eval_metrics.json'))):
        run = os.path.basename(os.path.dirname(os.path.dirname(path)))
        name, seed = re.fullmatch(r'(.+)_seed(\d+)', run).groups()
        runs.setdefault(name, {})[int(seed)] = os.path.dirname(path)
    return runs


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
    differences: List[np.ndarray] = []
    for s in shared:
        ours, theirs = read_paired_predictions(*(os.path.join(runs[n][s], 'predictions.csv') for n in (name, reference)))
        summary['per_seed'].append(paired_comparison(ours, theirs, 2000))
        differences.append(ours.astype(float) - theirs.astype(float))
    pooled = np.mean(differences, axis=0)  # [N]: per image, over the seeds both rows have
    low, high = bootstrap_interval(pooled)
    summary['pooled'] = {'difference': 100 * pooled.mean(), 'ci_low': 100 * low, 'ci_high': 100 * high,
                         'seeds': shared}
    return summary
