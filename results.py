"""One table of many runs: any run folders of main.py (or globs), markdown or CSV.

    python results.py 'output/offtheshelf/tuned/*' [--columns top1 kappa gflops params] [--csv]

A run's numbers come from its evaluation (RUN/eval/eval_metrics.json, or eval_metrics.json in the
folder itself), else from the last line of its log.txt (validation). Runs whose arguments differ
only in --seed and --output_dir are one group, printed as mean +- sd over the seeds.
"""
import argparse
import glob
import json
import os
import statistics
import sys
from typing import Dict, List, Optional

from utils import ArgumentParser, UserError, error_boundary
from workflow.runs import read_run

COLUMNS = {  # name: (header, how to read it from a run's record)
    'top1': ('top-1 (%)', lambda r: r.get('acc1')),
    'top5': ('top-5 (%)', lambda r: r.get('acc5')),
    'kappa': ('kappa', lambda r: r.get('kappa')),
    'gflops': ('GFLOPs', lambda r: r.get('gflops')),
    'params': ('params (M)', lambda r: r['parameters'] / 1e6 if r.get('parameters') else None),
    'throughput': ('img/s', lambda r: r.get('throughput')),
    'tokens': ('tokens after block 1 / last', lambda r: f'{r["merge_kept_num"][1]} / {r["merge_kept_num"][-1]}'
               if r.get('merge_kept_num') else None),
    'merged': ('merged / pruned tokens', lambda r: merged_pruned(r)),
    'split': ('split', lambda r: r.get('split', 'val')),
}
IGNORED = ('seed', 'output_dir', 'autoresume', 'resume', 'overwrite')


def merged_pruned(record: Dict) -> Optional[str]:
    prune, merge = record.get('prune_kept_num'), record.get('merge_kept_num')
    if not prune or not merge:
        return None
    merged = sum(p - m for p, m in zip(prune, merge))
    pruned = sum(n - p for n, p in zip([prune[0]] + merge[:-1], prune))
    return f'{merged} / {pruned}'


def cell(values: List) -> str:
    numbers = [v for v in values if isinstance(v, (int, float))]
    if len(numbers) == len(values) and numbers:
        mean = statistics.mean(numbers)
        digits = 4 if abs(mean) < 10 else 2
        return f'{mean:.{digits}f} +- {statistics.stdev(numbers):.{digits}f}' if len(numbers) > 1 \
            else f'{mean:.{digits}f}'
    return ', '.join(sorted({str(v) for v in values if v is not None})) or '-'


@error_boundary
def main(argv=None) -> int:
    parser = ArgumentParser(prog='results.py', description=__doc__.splitlines()[0],
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('runs', nargs='+', help='run folders or globs')
    parser.add_argument('--columns', nargs='+', default=['top1', 'kappa', 'gflops', 'params', 'tokens', 'merged'],
                        choices=sorted(COLUMNS), help='columns, in order')
    parser.add_argument('--csv', action='store_true', help='CSV instead of a markdown table')
    args = parser.parse_args(argv)
    folders = sorted({f for pattern in args.runs for f in (glob.glob(pattern) or [pattern]) if os.path.isdir(f)})
    groups: Dict[str, List] = {}
    for folder in folders:
        record = read_run(folder)
        if record is None:
            print(f'skipped {folder}: no args.json with a log or an evaluation', file=sys.stderr)
            continue
        key = json.dumps({k: v for k, v in record['args'].items() if k not in IGNORED}, sort_keys=True)
        groups.setdefault(key, []).append((folder, record))
    if not groups:
        raise UserError(f'no run folders (with args.json and a log or an evaluation) in {" ".join(args.runs)}')
    headers = ['run', 'seeds'] + [COLUMNS[c][0] for c in args.columns]
    rows = []
    for members in groups.values():
        name = os.path.commonprefix([os.path.basename(os.path.normpath(f)) for f, _ in members]).rstrip('_-') \
            or os.path.basename(os.path.normpath(members[0][0]))
        seeds = ', '.join(str(r['args'].get('seed')) for _, r in members)
        rows.append([name, seeds] + [cell([COLUMNS[c][1](r) for _, r in members]) for c in args.columns])
    if args.csv:
        import csv
        writer = csv.writer(sys.stdout)
        writer.writerows([headers] + rows)
    else:
        print('| ' + ' | '.join(headers) + ' |')
        print('|' + '---|' * len(headers))
        for row in rows:
            print('| ' + ' | '.join(row) + ' |')
    return 0


if __name__ == '__main__':
    sys.exit(main())
