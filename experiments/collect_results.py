"""Collect the NWPU-RESISC45 CPU runs of experiments/cpu_table.sh into the README table (markdown,
printed) and add the learned SDT2Net schedules, with their provenance, to compression_rate.json.

Throughput is measured here again, for all runs side by side (round-robin, batch 32, 112 px, the
process's default threads), because the evaluations of the runs overlapped with other training.

    python experiments/collect_results.py output/nwpu [--write-schedules] [--seeds output/nwpu_seed1 ...]

--seeds adds a second table: top-1 of each row over the main folder and folders of the same rows
run with other seeds (`SEED=1 experiments/cpu_table.sh DATA OUT`), with mean and standard deviation,
and each run's difference to the dense run of the same seed.
"""
import argparse
import json
import math
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmark import measure  # noqa: E402
from compression_schedule import DEFAULT_FILE, save_schedule  # noqa: E402
from factory import load_run_model  # noqa: E402

ROWS = [  # run folder, description
    ('deit_dense', 'DeiT-Tiny, dense (no EAB, no FTF, no compression)'),
    ('sdt2net_0.35', 'SDT2Net, target 0.35 GFLOPs'),
    ('sdt2net_0.30', 'SDT2Net, target 0.30 GFLOPs'),
    ('uniform_0.35', 'uniform hand-set merge schedule (ToMe-style) at 0.35 GFLOPs, EAB+FTF'),
    ('no_eab_0.177', 'SDT2Net without EAB, target 0.177 (= 0.35 minus the EAB cost)'),
    ('no_ftf_0.349', 'SDT2Net without FTF, target 0.349 (= 0.35 minus the FTF cost)'),
]
SCHEDULE_ROWS = ('sdt2net_0.35', 'sdt2net_0.30')


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('runs', help='the OUT folder of experiments/cpu_table.sh')
    parser.add_argument('--write-schedules', action='store_true', help='add the schedules to compression_rate.json')
    parser.add_argument('--seeds', nargs='+', default=[], metavar='OUT',
                        help='folders of the same rows run with other seeds: adds a table over seeds')
    args = parser.parse_args()
    done = [name for name, _ in ROWS if os.path.isfile(os.path.join(args.runs, name, 'eval', 'eval_metrics.json'))]
    images = torch.randn(32, 3, 112, 112)

    def forward(model):
        def run():
            with torch.no_grad():
                model(images)
        return run
    seconds = measure({name: forward(load_run_model(os.path.join(args.runs, name))[0]) for name in done},
                      torch.device('cpu'), warmup=1, repeats=5)
    print('| run | top-1 (%) | kappa | GFLOPs analytic | GFLOPs fvcore | params (M) | CPU img/s |')
    print('|---|---|---|---|---|---|---|')
    for name, description in ROWS:
        path = os.path.join(args.runs, name, 'eval', 'eval_metrics.json')
        if not os.path.isfile(path):
            print(f'| {description} | not run | | | | | |')
            continue
        m = json.load(open(path))
        print(f'| {description} | {m["acc1"]:.2f} | {m["kappa"]:.4f} | {m["gflops"]:.4f} | {m["gflops_fvcore"]:.4f} | '
              f'{m["parameters"] / 1e6:.2f} | {32 / seconds[name]:.1f} |')
        if args.write_schedules and name in SCHEDULE_ROWS:
            run_args = json.load(open(os.path.join(args.runs, name, 'args.json')))
            n = m['num_images']
            noise = 100 * math.sqrt(m['acc1'] / 100 * (1 - m['acc1'] / 100) / n)
            save_schedule(DEFAULT_FILE, m['model'], m['target_flops'], m['prune_kept_num'], m['merge_kept_num'],
                          gflops=round(m['gflops'], 4), input_size=m['input_size'],
                          provenance={
                              'data': 'NWPU-RESISC45 subset of ../shared/datasets (3150 train / 900 val, 10% split)',
                              'protocol': f'from scratch, {run_args["epochs"]} epochs, batch {run_args["batch_size"]}, '
                                          f'seed {run_args["seed"]}, 112 px, CPU (experiments/cpu_table.sh)',
                              'top1': round(m['acc1'], 2), 'top1_std_error': round(noise, 2),
                              'kappa': round(m['kappa'], 4),
                              'command': f'experiments/cpu_table.sh (row {name})'})
    if args.seeds:
        print_seed_table([args.runs] + args.seeds)
    return 0


def print_seed_table(folders) -> None:
    """Top-1 of every row found in at least two of `folders` (one seed each), mean and sample sd,
    and its difference to the dense row of the same seed (seeds move the rows largely together)."""
    def top1_by_seed(name):  # seed -> metrics of the row's run with that seed
        runs = {}
        for folder in folders:
            path = os.path.join(folder, name, 'eval', 'eval_metrics.json')
            if os.path.isfile(path):
                runs[json.load(open(os.path.join(folder, name, 'args.json')))['seed']] = json.load(open(path))
        return runs
    dense = top1_by_seed(ROWS[0][0])
    print('\n| run | top-1 (%) per seed | mean +- sd | minus dense, per seed (mean) | GFLOPs (range) |')
    print('|---|---|---|---|---|')
    for name, description in ROWS:
        runs = top1_by_seed(name)
        if len(runs) < 2:
            continue
        top1 = [m['acc1'] for m in runs.values()]
        gflops = [m['gflops'] for m in runs.values()]
        per_seed = ' / '.join(f'{m["acc1"]:.2f}' for m in runs.values())
        gains = [m['acc1'] - dense[seed]['acc1'] for seed, m in runs.items() if seed in dense]
        gain_text = f'{" / ".join(f"{g:+.2f}" for g in gains)} ({statistics.mean(gains):+.2f})' \
            if gains and name != ROWS[0][0] else '-'
        print(f'| {description} | {per_seed} (seeds {", ".join(map(str, runs))}) | '
              f'{statistics.mean(top1):.2f} +- {statistics.stdev(top1):.2f} | {gain_text} | '
              f'{min(gflops):.4f}-{max(gflops):.4f} |')


if __name__ == '__main__':
    sys.exit(main())
