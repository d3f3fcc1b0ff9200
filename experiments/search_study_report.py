"""Tables and figure of experiments/search_study.sh: for every backbone, budget and recipe, the
learned schedule against the geometric and ToMe merge schedules at the FLOPs it reached (paired
differences on the same images, 95% bootstrap intervals, on val/ and test/); DiffRate's merge rule
against the size-weighted one; the learned schedules' shapes.

    python -m experiments.search_study_report OUT [OUT ...] [--figure figures/search_study.png] [--write-schedules]

--write-schedules puts into compression_rate.json, for every budget searched on the first OUT, the
schedule of the recipe that did best against the geometric schedule on val/, with its provenance.
"""
import glob
import os
import re
import sys

import matplotlib

from models import Schedule
from utils import ArgumentParser, UserError, error_boundary, read_json
from workflow.runs import seed_runs
from workflow.schedule_file import DEFAULT_FILE, save_schedule
from workflow.stats import compare_files, summarise

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file backend)


def evaluation(out: str, split: str, name: str):
    path = os.path.join(out, 'eval', split, name, 'eval_metrics.json')
    return read_json(path) if os.path.isfile(path) else None


def paired(out: str, split: str, a: str, b: str):
    """a minus b on the same images of `split`: (difference, low, high) in points, or None."""
    files = [os.path.join(out, 'eval', split, n, 'predictions.csv') for n in (a, b)]
    if not all(os.path.isfile(f) for f in files):
        return None
    c = compare_files(*files, resamples=4000)
    return c['difference'], c['ci_low'], c['ci_high']


def cell(diff) -> str:
    return '-' if diff is None else f'{diff[0]:+.2f} [{diff[1]:+.2f}, {diff[2]:+.2f}]'


def searches(out: str):
    """(recipe, budget) of every finished search evaluation under out."""
    found = []
    for path in glob.glob(os.path.join(out, 'eval', 'test', '*', 'eval_metrics.json')):
        match = re.fullmatch(r'([a-z][a-z0-9_]*?)_([\d.]+)', os.path.basename(os.path.dirname(path)))
        if match and not match.group(1).startswith('rule_'):
            found.append((match.group(1), match.group(2)))
    return sorted(found, key=lambda rb: (-float(rb[1]), rb[0]))


def tables(outs) -> str:
    lines = ['| backbone | budget | recipe | schedule found (kept tokens after each block) | GFLOPs | top-1 test | '
             'minus geometric, val [95% CI] | minus geometric, test | minus ToMe, test |', '|---' * 9 + '|']
    rules = ['| backbone | budget | DiffRate rule top-1 test | minus size-weighted, val [95% CI] | test |', '|---' * 5 + '|']
    for out in outs:
        dense = evaluation(out, 'test', 'dense')
        label = os.path.basename(os.path.normpath(out)) + (f' (dense {dense["acc1"]:.2f}%)' if dense else '')
        for recipe, budget in searches(out):
            name = f'{recipe}_{budget}'
            metrics = evaluation(out, 'test', name)
            kept = ', '.join(str(k) for k in metrics['merge_kept_num'])
            lines.append(f'| {label} | {budget} | {recipe} | {kept} | {metrics["gflops"]:.4f} | '
                         f'{metrics["acc1"]:.2f} | '
                         f'{cell(paired(out, "val", name, name + "_geometric"))} | '
                         f'{cell(paired(out, "test", name, name + "_geometric"))} | '
                         f'{cell(paired(out, "test", name, name + "_tome"))} |')
        for path in sorted(glob.glob(os.path.join(out, 'eval', 'test', 'rule_diffrate_*', 'eval_metrics.json'))):
            budget = os.path.basename(os.path.dirname(path)).rsplit('_', 1)[1]
            a, b = f'rule_diffrate_{budget}', f'rule_size-weighted_{budget}'
            rules.append(f'| {label} | {budget} | {read_json(path)["acc1"]:.2f} | {cell(paired(out, "val", a, b))} | '
                         f'{cell(paired(out, "test", a, b))} |')
    recipes = ['| backbone | budget | recipe minus diffrate | val [95% CI] | test |', '|---' * 5 + '|']
    for out in outs:
        for recipe, budget in searches(out):
            a, b = f'{recipe}_{budget}', f'diffrate_{budget}'
            if recipe != 'diffrate' and evaluation(out, 'test', b) is not None:
                recipes.append(f'| {os.path.basename(os.path.normpath(out))} | {budget} | {recipe} | '
                               f'{cell(paired(out, "val", a, b))} | {cell(paired(out, "test", a, b))} |')
    tuned = ['| backbone | fine-tuned schedule | GFLOPs | top-1 test per seed | mean +- sd | '
             'minus geometric per seed [95% CI] |',
             '|---' * 6 + '|']
    for out in outs:
        runs = seed_runs(os.path.join(out, 'tuned'))
        for name in sorted(n for n in runs if not n.startswith('geometric_')):
            rival = 'geometric_' + name.rsplit('_', 1)[1]
            for row in (summarise(runs, name, rival), summarise(runs, rival) if rival in runs else None):
                if row is None:
                    continue
                diffs = '; '.join(cell((c['difference'], c['ci_low'], c['ci_high'])) for c in row['per_seed']) or '-'
                if row['pooled']:
                    pooled = row['pooled']
                    diffs += f'; seed-averaged {cell((pooled["difference"], pooled["ci_low"], pooled["ci_high"]))}'
                tuned.append(f'| {os.path.basename(os.path.normpath(out))} | {row["name"]} | '
                             f'{row["metrics"]["gflops"]:.4f} | '
                             f'{" / ".join(f"{a:.2f}" for a in row["top1"])} (seeds {", ".join(map(str, row["seeds"]))}) | '
                             f'{row["mean"]:.2f} +- {row["sd"]:.2f} | {diffs} |')
    return '\n\n'.join('\n'.join(t) for t in (lines, rules, recipes, tuned) if len(t) > 2)


def figure(outs, path: str) -> None:
    """Left: kept tokens per block of every learned schedule of the first backbone and of its
    geometric rival. Right: every search minus the geometric schedule on test/, with its 95%
    paired interval, one row each."""
    fig, (shapes, diffs) = plt.subplots(1, 2, figsize=(12, 5.5), gridspec_kw={'width_ratios': [1, 1.1]})
    labels, points = [], []
    for o, out in enumerate(outs):
        for index, (recipe, budget) in enumerate(searches(out)):
            name = f'{recipe}_{budget}'
            if o == 0:
                learned, rival = evaluation(out, 'test', name), evaluation(out, 'test', name + '_geometric')
                shapes.plot(learned['merge_kept_num'], marker='o', markersize=3, color=f'C{index % 10}',
                            label=f'{recipe} {budget}')
                if rival is not None:
                    shapes.plot(rival['merge_kept_num'], linestyle=':', color=f'C{index % 10}')
            diff = paired(out, 'test', name, name + '_geometric')
            if diff is not None:
                labels.append(f'{os.path.basename(os.path.normpath(out))} {recipe} {budget}')
                points.append(diff)
    shapes.set_xlabel('block')
    shapes.set_ylabel('tokens after the block (with class token)')
    shapes.set_title(f'{os.path.basename(os.path.normpath(outs[0]))}: learned (solid), geometric at its FLOPs (dotted)',
                     fontsize=9)
    shapes.legend(fontsize=7)
    for i, (d, low, high) in enumerate(points):
        diffs.errorbar([d], [i], xerr=[[d - low], [high - d]], marker='o', capsize=3, color='C0')
    diffs.axvline(0, color='black', linewidth=1)
    diffs.set_yticks(range(len(labels)), labels, fontsize=7)
    diffs.invert_yaxis()
    # at least 8 points wide (the 95% intervals are about +-0.8), and every interval inside
    lowest = min([-5.0] + [low - 0.5 for _, low, _ in points])
    diffs.set_xlim(lowest, max([3.0] + [high + 0.5 for _, _, high in points]))
    diffs.set_xlabel('learned minus geometric at equal FLOPs, test (points, 95% CI)')
    for ax in (shapes, diffs):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


REACHED = 0.05  # a search that ended further above its budget (relative) is not its budget's schedule


def write_schedules(out: str) -> None:
    """Per budget, the recipe chosen on val/ (its lead over the geometric schedule) among the
    searches that reached the budget, into compression_rate.json with what produced it and how it
    compared on test/."""
    dense = evaluation(out, 'test', 'dense')
    for budget in sorted({b for _, b in searches(out)}, key=float, reverse=True):
        scored = [(paired(out, 'val', f'{r}_{budget}', f'{r}_{budget}_geometric'), r)
                  for r, b in searches(out)
                  if b == budget and evaluation(out, 'test', f'{r}_{b}')['gflops'] <= float(b) * (1 + REACHED)]
        scored = [(diff[0], recipe) for diff, recipe in scored if diff is not None]
        if not scored:
            continue
        _, recipe = max(scored)
        name = f'{recipe}_{budget}'
        metrics = evaluation(out, 'test', name)
        versus = paired(out, 'test', name, name + '_geometric')
        save_schedule(DEFAULT_FILE, 'sdt2net_tiny_patch16_224', float(budget),
                      Schedule(metrics['prune_kept_num'], metrics['merge_kept_num']),
                      gflops=round(metrics['gflops'], 4), input_size=112, provenance={
                          'data': 'NWPU-RESISC45 of ../shared/datasets (search on train/, recipe chosen on val/, '
                                  'top-1 on test/)',
                          'protocol': f'rate-only search, recipe "{recipe}" of experiments/search_study.sh, on the '
                                      f'frozen dense DeiT-Tiny (EAB/FTF off, 112 px) of {os.path.basename(out)}; '
                                      'no fine-tuning',
                          'top1_test': round(metrics['acc1'], 2), 'dense_top1_test': round(dense['acc1'], 2),
                          'minus_geometric_merge_test': f'{versus[0]:+.2f} [{versus[1]:+.2f}, {versus[2]:+.2f}]',
                          'command': 'experiments/search_study.sh, then python -m experiments.search_study_report '
                                     '--write-schedules'})


@error_boundary
def main(argv=None) -> int:
    parser = ArgumentParser(prog='search_study_report', description=__doc__.splitlines()[0])
    parser.add_argument('outs', nargs='+', help='OUT folders of experiments/search_study.sh (one per backbone)')
    parser.add_argument('--figure', default='figures/search_study.png', help='where the figure goes')
    parser.add_argument('--write-schedules', action='store_true',
                        help='put the schedules chosen on val/ of the first OUT into compression_rate.json')
    args = parser.parse_args(argv)
    missing = [out for out in args.outs if not searches(out)]
    if missing:
        raise UserError(f'no finished search evaluations in {", ".join(missing)}: run experiments/search_study.sh')
    print(tables(args.outs))
    figure(args.outs, args.figure)
    print(f'figure: {args.figure}')
    if args.write_schedules:
        write_schedules(args.outs[0])
    return 0


if __name__ == '__main__':
    sys.exit(main())
