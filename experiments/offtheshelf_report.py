"""Tables and figures of experiments/offtheshelf.sh: top-1 on test/ of every schedule at every
budget, paired differences against the learned schedule (bootstrap CI, McNemar), the accuracy-FLOPs
curves and the learned schedules beside DiffRate's published ones.

    python -m experiments.offtheshelf_report [OUT] [--figures figures] [--write-schedules]
"""
import glob
import json
import math
import os
import re
import sys

import matplotlib

from models import Schedule
from utils import ArgumentParser, UserError, error_boundary
from workflow.runs import seed_runs
from workflow.schedule_file import DEFAULT_FILE, save_schedule
from workflow.stats import compare_files, summarise

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file backend)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

REFERENCE = os.path.join(ROOT, '..', 'shared', 'reference', 'diffrate_compression_rate.json')
MODEL = 'sdt2net_tiny_patch16_224'
ROWS = [  # evaluation name prefix, description
    ('learned', 'learned (DiffRate search, prune + merge)'),
    ('learned_dense', 'learned, search from the dense start'),
    ('learned_dense_merge_only', 'learned from the dense start, counts all merged'),
    ('learned_long', 'learned, 15-epoch search'),
    ('geometric_merge_long', 'same fraction merged per block, at the 15-epoch search\'s FLOPs'),
    ('learned_merge_only', 'learned counts, all merged'),
    ('learned_prune_only', 'learned counts, all pruned'),
    ('uniform_merge', 'same count merged per block (ToMe)'),
    ('uniform_prune', 'same count pruned per block (top-k class attention)'),
    ('geometric_merge', 'same fraction merged per block'),
    ('geometric_prune', 'same fraction pruned per block'),
]


def load(out, name):
    path = os.path.join(out, 'eval', name, 'eval_metrics.json')
    return json.load(open(path)) if os.path.isfile(path) else None


def binomial_ci(acc, n):
    """Half-width of the 95% normal interval of an accuracy (%) on n images."""
    return 196 * math.sqrt(acc / 100 * (1 - acc / 100) / n)


def budgets(out):
    found = [re.fullmatch(r'search_(?:dense_|long_)?([\d.]+)', os.path.basename(p))
             for p in glob.glob(os.path.join(out, 'search_*'))]
    return sorted({m.group(1) for m in found if m}, key=float, reverse=True)


def table(out):
    dense = load(out, 'dense')
    lines = [f'dense backbone: {dense["acc1"]:.2f}% top-1 on {dense["num_images"]} test images '
             f'(+- {binomial_ci(dense["acc1"], dense["num_images"]):.2f}), {dense["gflops"]:.4f} GFLOPs', '',
             '| budget | schedule | GFLOPs | % of dense | top-1 (%) | minus learned [95% CI] | McNemar p |',
             '|---|---|---|---|---|---|---|']
    for budget in budgets(out):
        learned_predictions = os.path.join(out, 'eval', f'learned_{budget}', 'predictions.csv')
        for prefix, description in ROWS:
            metrics = load(out, f'{prefix}_{budget}')
            if metrics is None:
                continue
            cell = '-'
            p_value = '-'
            if prefix != 'learned':
                # the longer search's hand-set rival sits at that search's FLOPs: compare the two
                reference = os.path.join(out, 'eval', f'learned_long_{budget}', 'predictions.csv') \
                    if prefix == 'geometric_merge_long' else learned_predictions
                c = compare_files(os.path.join(out, 'eval', f'{prefix}_{budget}', 'predictions.csv'), reference)
                cell = f'{c["difference"]:+.2f} [{c["ci_low"]:+.2f}, {c["ci_high"]:+.2f}]'
                p_value = f'{c["mcnemar_p"]:.2g}'
            lines.append(f'| {budget} | {description} | {metrics["gflops"]:.4f} | '
                         f'{100 * metrics["gflops"] / dense["gflops"]:.0f} | {metrics["acc1"]:.2f} | {cell} | {p_value} |')
    return '\n'.join(lines)


def finetune_table(out):
    """Fine-tuned runs of experiments/finetune.sh: top-1 on test/ per seed, mean +- sd, and each
    seed's paired difference to the dense backbone fine-tuned with the same seed."""
    runs = seed_runs(os.path.join(out, 'tuned'))
    if 'dense' not in runs:
        return ''
    lines = ['| fine-tuned | GFLOPs | top-1 (%) per seed | mean +- sd | minus dense of the same seed [95% CI] |',
             '|---|---|---|---|---|']
    for name in ['dense'] + sorted((n for n in runs if n != 'dense'), key=lambda n: -float(n.split('_')[-1])):
        row = summarise(runs, name, 'dense')
        diffs = '; '.join(f'{c["difference"]:+.2f} [{c["ci_low"]:+.2f}, {c["ci_high"]:+.2f}]'
                          for c in row['per_seed']) or '-'
        lines.append(f'| {name} | {row["metrics"]["gflops"]:.4f} | {" / ".join(f"{a:.2f}" for a in row["top1"])} '
                     f'(seeds {", ".join(map(str, row["seeds"]))}) | {row["mean"]:.2f} +- {row["sd"]:.2f} | {diffs} |')
    return '\n'.join(lines)


def plot_curves(out, path):
    """Left: top-1 against GFLOPs with 95% intervals. Right: each schedule minus the learned one on
    the same images, with its 95% paired-bootstrap interval (the comparison the table makes)."""
    dense = load(out, 'dense')
    fig, (ax, diff_ax) = plt.subplots(1, 2, figsize=(11, 4.4))
    for index, (prefix, description) in enumerate(ROWS):
        points, diffs = [], []
        for budget in budgets(out):
            metrics = load(out, f'{prefix}_{budget}')
            if metrics is None:
                continue
            points.append((metrics['gflops'], metrics['acc1'], binomial_ci(metrics['acc1'], metrics['num_images'])))
            if prefix != 'learned' and 'long' not in prefix and load(out, f'learned_{budget}') is not None:
                c = compare_files(os.path.join(out, 'eval', f'{prefix}_{budget}', 'predictions.csv'),
                                  os.path.join(out, 'eval', f'learned_{budget}', 'predictions.csv'), 2000)
                diffs.append((metrics['gflops'], c['difference'], c['difference'] - c['ci_low'],
                              c['ci_high'] - c['difference']))
        if points:
            x, y, e = zip(*sorted(points))
            ax.errorbar(x, y, yerr=e, marker='o', capsize=3, label=description, color=f'C{index}')
        if diffs:
            x, y, low, high = zip(*sorted(diffs))
            diff_ax.errorbar(x, y, yerr=[low, high], marker='o', capsize=3, color=f'C{index}')
    ax.errorbar([dense['gflops']], [dense['acc1']], yerr=[binomial_ci(dense['acc1'], dense['num_images'])],
                marker='*', color='black', capsize=3, label='dense backbone')
    ax.set_ylim(dense['acc1'] - 15, dense['acc1'] + 5)  # 20 points; the 95% intervals are about +-1.5
    ax.set_xlabel('GFLOPs per image (analytic = fvcore)')
    ax.set_ylabel('top-1 on NWPU test/ (%), 95% CI')
    ax.set_title('same frozen DeiT-Tiny (112 px), schedules at equal FLOPs', fontsize=9)
    diff_ax.axhline(0, color='C0', linewidth=1)
    diff_ax.set_ylim(-7, 3)
    diff_ax.set_xlabel('GFLOPs per image')
    diff_ax.set_ylabel('minus learned, same images (points, 95% CI)')
    diff_ax.set_title('paired difference to the learned schedule', fontsize=9)
    for a in (ax, diff_ax):
        a.grid(alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), fontsize=7, loc='lower center', ncol=4)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_schedules(out, path):
    """Tokens pruned and merged per block (as a share of the patches), learned here and DiffRate's."""
    panels = []
    for prefix, start in (('learned', 'uniform start'), ('learned_dense', 'dense start'),
                          ('learned_long', '15 epochs')):
        for budget in budgets(out):
            metrics = load(out, f'{prefix}_{budget}')
            if metrics is not None:
                panels.append((f'learned, {start}, {metrics["gflops"]:.3f} G',
                               Schedule(metrics['prune_kept_num'], metrics['merge_kept_num'])))
    if os.path.isfile(REFERENCE):
        published = json.load(open(REFERENCE))
        for key, target in (('ViT-T-DeiT', '0.6'), ('ViT-S-DeiT', '2.9')):
            entry = published[key][target]
            schedule = Schedule(json.loads(entry['prune_kept_num']), json.loads(entry['merge_kept_num'])).running_min()
            panels.append((f'DiffRate {key} {target} G (published)', schedule))
    columns = min(len(panels), 5)
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.0 * columns, 2.8 * rows), sharey=True, squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis('off')
    for ax, (title, schedule) in zip(axes.flat, panels):
        patches = schedule.prune[0] - 1
        blocks = range(schedule.depth)
        pruned = [100 * p / patches for p in schedule.pruned_tokens()]
        merged = [100 * m / patches for m in schedule.merged_tokens()]
        ax.bar(blocks, pruned, color='tab:gray', label='pruned')
        ax.bar(blocks, merged, bottom=pruned, color='tab:orange', label='merged')
        ax.set_title(title, fontsize=8)
        ax.set_xticks(range(0, schedule.depth, 2))
        ax.set_xlabel('block')
        ax.grid(alpha=0.3, axis='y')
    for row in axes:
        row[0].set_ylabel('removed in the block\n(% of patches)')
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_schedules(out):
    """The learned schedules into compression_rate.json, with what produced them."""
    dense = load(out, 'dense')
    for budget in budgets(out):
        metrics = load(out, f'learned_{budget}')
        if metrics is None:
            continue
        save_schedule(DEFAULT_FILE, MODEL, float(budget), Schedule(metrics['prune_kept_num'], metrics['merge_kept_num']),
                      gflops=round(metrics['gflops'], 4), input_size=112, provenance={
                          'data': 'NWPU-RESISC45 subset of ../shared/datasets (search on train/, top-1 on test/)',
                          'protocol': 'rate-only search (3 epochs) on the frozen dense DeiT-Tiny (EAB/FTF off, 112 px) '
                                      'trained for 40 epochs on train/; no fine-tuning',
                          'top1_test': round(metrics['acc1'], 2), 'dense_top1_test': round(dense['acc1'], 2),
                          'command': f'experiments/offtheshelf.sh (search_{budget}), then '
                                     'python -m experiments.offtheshelf_report --write-schedules'})


@error_boundary
def main(argv=None) -> int:
    parser = ArgumentParser(prog='offtheshelf_report.py', description=__doc__.splitlines()[0])
    parser.add_argument('out', nargs='?', default='output/offtheshelf', help='OUT of experiments/offtheshelf.sh')
    parser.add_argument('--figures', default='figures', help='where the two figures go')
    parser.add_argument('--write-schedules', action='store_true', help='add the learned schedules to compression_rate.json')
    args = parser.parse_args(argv)
    if load(args.out, 'dense') is None:
        raise UserError(f'no evaluation of the dense backbone in {os.path.join(args.out, "eval", "dense")}: '
                        'run experiments/offtheshelf.sh first')
    print(table(args.out))
    tuned = finetune_table(args.out)
    if tuned:
        print('\n' + tuned)
    os.makedirs(args.figures, exist_ok=True)
    plot_curves(args.out, os.path.join(args.figures, 'offtheshelf_accuracy_vs_flops.png'))
    plot_schedules(args.out, os.path.join(args.figures, 'offtheshelf_schedules.png'))
    if args.write_schedules:
        write_schedules(args.out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
