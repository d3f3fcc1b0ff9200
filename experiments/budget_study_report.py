"""Tables and figure of experiments/budget_study.sh, one OUT per backbone: where each search landed
against its budget; on test/, each learned schedule (and their mean over the search seeds, image by
image) minus the geometric schedule, ToMe's and the back-loaded member chosen on val/, at the same
budget (paired differences, 95% bootstrap intervals); the back-loaded family on val/; the
fine-tuned learned schedule against the fine-tuned rule (3 seeds each); each search where it stopped
(its learned counts) against the rules at the FLOPs it reached.

    python -m experiments.budget_study_report OUT [OUT ...] [--figure figures/budget_study.png]
"""
import glob
import os
import re
import sys
from typing import Dict, List

import matplotlib
import numpy as np

from utils import ArgumentParser, UserError, error_boundary, read_json
from workflow.runs import seed_runs
from workflow.stats import difference_text, paired_comparison, seed_averaged_difference, summarise

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file backend)


def evaluations(out: str, split: str) -> Dict[float, Dict]:
    """{budget: experiments/budget_fit.py's --out} of one backbone's split."""
    found = {}
    for path in glob.glob(os.path.join(out, f'eval_*_{split}.json')):
        match = re.fullmatch(rf'eval_([\d.]+)_{split}\.json', os.path.basename(path))
        if match:  # not the as-learned evaluations
            found[float(match.group(1))] = read_json(path)
    return dict(sorted(found.items(), reverse=True))


def as_learned(out: str) -> List[str]:
    """Each search's own learned counts against the rules at the FLOPs they reached, on test/."""
    lines = []
    for path in sorted(glob.glob(os.path.join(out, 'eval_*_s*_as_learned_test.json'))):
        budget = re.fullmatch(r'eval_([\d.]+)_s\d+_as_learned_test\.json', os.path.basename(path)).group(1)
        result = read_json(path)
        (label, learned), = [(k, s) for k, s in result['schedules'].items() if s['kind'] == 'learned']
        cells = [f'{key.split(" - ", 1)[1]}: {difference_text(d)}' for key, d in result['differences'].items()]
        lines.append(f'| {os.path.basename(out)} | {budget} | {label} | {learned["gflops"]:.4f} | {learned["top1"]:.2f} | '
                     + ' | '.join(cells) + ' |')
    return lines


def correct(result: Dict, label: str) -> np.ndarray:
    return np.array([c == '1' for c in result['schedules'][label]['correct']])


def landing(out: str) -> List[str]:
    """One row per search: budget, the learned counts' FLOPs, the filed ones'."""
    lines = ['| backbone | budget (GFLOPs) | search seed | learned | filed | filed / budget | merge kept per block (filed) |',
             '|---' * 7 + '|']
    for path in sorted(glob.glob(os.path.join(out, 'search_*_s*', 'compression_rate.json'))):
        budget, seed = re.fullmatch(r'search_([\d.]+)_s(\d+)', os.path.basename(os.path.dirname(path))).groups()
        entry = next(iter(read_json(path).values()))[budget]  # the file of one search holds one model
        learned = entry.get('learned', {}).get('gflops', entry['gflops'])
        lines.append(f'| {os.path.basename(out)} | {budget} | {seed} | {learned:.4f} | {entry["gflops"]:.4f} | '
                     f'{entry["gflops"] / float(budget):.3f} | {", ".join(map(str, entry["merge_kept_num"]))} |')
    return lines


def comparison(out: str, figure_rows: List) -> List[str]:
    """Rows of the test/ table, and (label, differences) for the figure."""
    lines = []
    for budget, result in evaluations(out, 'test').items():
        schedules = result['schedules']
        learned = [label for label, s in schedules.items() if s['kind'] == 'learned']
        rules = [label for label, s in schedules.items() if s['kind'] == 'rule']
        backloaded = next(label for label in rules if label.startswith('backloaded'))
        columns = [label for label in ('geometric', 'ToMe (same count)', backloaded) if label in rules]
        cells = {label: [paired_comparison(correct(result, label), correct(result, rule), 4000) for rule in columns]
                 for label in learned}
        cells['mean over search seeds'] = [seed_averaged_difference([correct(result, label) for label in learned],
                                                                  [correct(result, rule)]) for rule in columns]
        for label, differences in cells.items():
            s = schedules.get(label)
            top1 = f'{s["top1"]:.2f}' if s else f'{np.mean([schedules[x]["top1"] for x in learned]):.2f}'
            gflops = f'{s["gflops"]:.4f}' if s else ''
            lines.append(f'| {os.path.basename(out)} | {budget} | {label} | {gflops} | {top1} | ' +
                         ' | '.join(f'{rule}: {difference_text(d)}' for rule, d in zip(columns, differences)) + ' |')
            if not s:
                figure_rows.append((f'{os.path.basename(out)}, {budget}', columns, differences))
        lines.append(f'| {os.path.basename(out)} | {budget} | rules | ' + ', '.join(
            f'{rule} {schedules[rule]["gflops"]:.4f}' for rule in columns) + ' | ' +
            ', '.join(f'{schedules[rule]["top1"]:.2f}' for rule in columns) + ' | |')
    return lines


def family(out: str) -> List[str]:
    """The back-loaded family and the other rules on val/, per budget: the choice test/ reports."""
    lines = []
    for budget, result in evaluations(out, 'val').items():
        cells = ', '.join(f'{label} {s["top1"]:.2f}' for label, s in result['schedules'].items())
        lines.append(f'| {os.path.basename(out)} | {budget} | {cells} | {result["chosen"]["rule"]["label"]} |')
    return lines


def spread(summary: Dict) -> str:
    """'mean +- sd (n seeds)' of a summarise(); one seed has no sd."""
    n = len(summary['seeds'])
    return f'{summary["mean"]:.2f}' + (f' +- {summary["sd"]:.2f}' if n > 1 else '') + f' ({n} seed{"s" if n > 1 else ""})'


def tuning(out: str) -> List[str]:
    runs = seed_runs(os.path.join(out, 'tuned'))
    lines = []
    for name in sorted(n for n in runs if n.startswith('learned_')):
        reference = 'rule_' + name.split('_', 1)[1]
        if reference not in runs:
            continue
        ours, theirs = summarise(runs, name, reference), summarise(runs, reference)
        per_seed = ', '.join(difference_text(d) for d in ours['per_seed'])
        pooled = ours['pooled']
        lines.append(f'| {os.path.basename(out)} | {name} | {spread(ours)} | {spread(theirs)} | {per_seed} | '
                     f'{pooled["difference"]:+.2f} [{pooled["ci_low"]:+.2f}, {pooled["ci_high"]:+.2f}] |')
    return lines


def draw(rows, path: str) -> None:
    """Per backbone and budget, the seed-averaged learned schedule minus each rule, 95% intervals."""
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * sum(len(r[1]) for r in rows)))
    y, ticks = 0, []
    for title, columns, differences in rows:
        for rule, d in zip(columns, differences):
            ax.errorbar(d['difference'], y, xerr=[[d['difference'] - d['ci_low']], [d['ci_high'] - d['difference']]],
                        fmt='o', color='C0', capsize=3)
            ticks.append((y, f'{title}: minus {rule}'))
            y -= 1
        y -= 0.5
    ax.axvline(0, color='k', lw=0.8)
    ax.set_yticks([t[0] for t in ticks], [t[1] for t in ticks], fontsize=8)
    ax.set_xlim(-6, 6)  # points of top-1: the scale of the intervals, not of the point estimates
    ax.set_xlabel('learned (mean over 3 search seeds) minus the rule, top-1 points on test/ [95% CI]')
    fig.tight_layout()
    fig.savefig(path, dpi=110)


@error_boundary
def main(argv=None) -> int:
    parser = ArgumentParser(prog='budget_study_report.py', description=__doc__.splitlines()[0])
    parser.add_argument('outs', nargs='+', help='output folders of experiments/budget_study.sh, one per backbone')
    parser.add_argument('--figure', default='', help='write the figure of the seed-averaged differences here')
    args = parser.parse_args(argv)
    for out in args.outs:
        if not glob.glob(os.path.join(out, 'search_*_s*', 'compression_rate.json')):
            raise UserError(f'{out} holds no finished search of experiments/budget_study.sh')
    figure_rows: List = []
    sections = [
        ('Where the searches landed', landing),
        ('On test/: learned minus each rule at the same budget (back-loaded member chosen on val/)',
         lambda out: ['| backbone | budget | learned | GFLOPs | top-1 | minus each rule [95% CI] |', '|---' * 6 + '|']
         + comparison(out, figure_rows)),
        ('On test/: each search where it stopped (its learned counts) minus each rule at those FLOPs',
         lambda out: ['| backbone | budget | search | GFLOPs | top-1 | minus each rule [95% CI] |', '|---' * 6 + '|']
         + as_learned(out)),
        ('The rules on val/ (top-1) and the one chosen', lambda out: ['| backbone | budget | top-1 | chosen |', '|---' * 4 + '|']
         + family(out)),
        ('Fine-tuned under the learned schedule and the chosen rule, on test/',
         lambda out: ['| backbone | run | learned mean +- sd | rule mean +- sd | learned minus rule per seed | '
                      'seed-averaged [95% CI] |', '|---' * 6 + '|'] + tuning(out)),
    ]
    for title, rows in sections:
        print(f'\n### {title}\n')
        for out in args.outs:
            for line in rows(out)[(0 if out == args.outs[0] else 2):]:
                print(line)
    if args.figure and figure_rows:
        draw(figure_rows, args.figure)
        print(f'\nfigure: {args.figure}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
