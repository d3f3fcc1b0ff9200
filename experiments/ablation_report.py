"""Table and figure of experiments/ablation.sh: per row (DeiT + DTC, + EAB, + FTF, + EAB + FTF) the
searched schedule's GFLOPs and tokens, parameters, CPU throughput measured side by side, top-1 on
test/ per seed with mean +- sd, and the paired difference to DeiT + DTC.

    python -m experiments.ablation_report [OUT] [--figures figures] [--throughput]
"""
import json
import os
import sys

import matplotlib
import torch

from utils import ArgumentParser, error_boundary
from workflow.runs import load_trained_model, seed_runs
from workflow.stats import summarise
from workflow.timing import inference, measure

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file backend)

ROWS = [('deit', 'DeiT + DTC'), ('eab', '+ EAB'), ('ftf', '+ FTF'), ('both', '+ EAB + FTF')]


def throughput(folder: str, names, batches=(1, 32), repeats: int = 7):
    """Images per second of each row's fine-tuned model (seed 0), measured round-robin on the CPU."""
    nets = {name: load_trained_model(os.path.join(folder, f'{name}_seed0', 'checkpoint.pth'))[0] for name in names}
    size = nets[names[0]].patch_embed.img_size[0]
    result = {}
    for batch in batches:
        images = torch.randn(batch, 3, size, size)
        seconds = measure({name: inference(net, images) for name, net in nets.items()}, torch.device('cpu'), 2, repeats)
        for name, s in seconds.items():
            result.setdefault(name, {})[batch] = batch / s
    return result


def table(folder: str, speeds) -> str:
    runs = seed_runs(folder)
    lines = ['| row | GFLOPs | tokens after the last block | parameters (M) | img/s batch 1 / 32 | top-1 (%) per seed '
             '| mean +- sd | minus DeiT + DTC, seed-averaged [95% CI] |', '|---|---|---|---|---|---|---|---|']
    for name, label in ROWS:
        if name not in runs:
            continue
        row = summarise(runs, name, 'deit')
        m = row['metrics']
        speed = ' / '.join(f'{speeds[name][b]:.0f}' for b in sorted(speeds[name])) if name in speeds else '-'
        pooled = row['pooled']
        diff = f'{pooled["difference"]:+.2f} [{pooled["ci_low"]:+.2f}, {pooled["ci_high"]:+.2f}]' if pooled else '-'
        lines.append(f'| {label} | {m["gflops"]:.4f} | {m["merge_kept_num"][-1]} | {m["parameters"] / 1e6:.2f} | '
                     f'{speed} | {" / ".join(f"{a:.2f}" for a in row["top1"])} | {row["mean"]:.2f} +- '
                     f'{row["sd"]:.2f} | {diff} |')
    return '\n'.join(lines)


def schedules(folder: str) -> str:
    """The kept-token counts each row's search found (merge counts, class token included)."""
    lines = []
    for name, label in ROWS:
        path = os.path.join(folder, f'search_{name}', 'compression_rate.json')
        if os.path.isfile(path):
            entry = next(iter(next(iter(json.load(open(path)).values())).values()))
            lines.append(f'{label}: {entry["gflops"]} GFLOPs, prune {entry["prune_kept_num"]}, '
                         f'merge {entry["merge_kept_num"]}')
    return '\n'.join(lines)


def plot(folder: str, path: str) -> None:
    """Each row's seeds (dots), mean +- sd, and the seed-averaged difference to DeiT + DTC with its
    95% paired interval; the y-axes span at least 4 points so that noise does not look like an effect."""
    runs = seed_runs(folder)
    fig, (ax, diff_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    labels = []
    for index, (name, label) in enumerate(ROWS):
        if name not in runs:
            continue
        row = summarise(runs, name, 'deit')
        labels.append(f'{label}\n{row["metrics"]["gflops"]:.3f} GFLOPs')
        x = len(labels) - 1
        ax.scatter([x] * len(row['top1']), row['top1'], color='0.6', s=12, zorder=2)
        ax.errorbar([x], [row['mean']], yerr=[row['sd']], marker='o', capsize=4, color=f'C{index}', zorder=3)
        if row['pooled']:
            p = row['pooled']
            diff_ax.errorbar([x], [p['difference']], yerr=[[p['difference'] - p['ci_low']], [p['ci_high'] - p['difference']]],
                             marker='o', capsize=4, color=f'C{index}')
    for axis, title in ((ax, 'top-1 on test (%), seeds and mean +- sd'), (diff_ax, 'minus DeiT + DTC (points, 95% CI)')):
        axis.set_xticks(range(len(labels)), labels)
        low, high = axis.get_ylim()
        middle = (low + high) / 2
        axis.set_ylim(min(low, middle - 2), max(high, middle + 2))
        axis.set_title(title, fontsize=10)
        axis.grid(alpha=0.3)
    diff_ax.axhline(0, color='k', lw=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@error_boundary
def main(argv=None) -> int:
    parser = ArgumentParser(prog='ablation_report.py', description=__doc__.splitlines()[0])
    parser.add_argument('out', nargs='?', default='output/offtheshelf', help='OUT of experiments/ablation.sh')
    parser.add_argument('--figures', default='figures', help='where the figure goes')
    parser.add_argument('--throughput', action='store_true', help='also measure each row (needs a quiet machine)')
    args = parser.parse_args(argv)
    folder = os.path.join(args.out, 'ablation')
    names = [name for name, _ in ROWS if os.path.isdir(os.path.join(folder, f'{name}_seed0'))]
    speeds = throughput(folder, names) if args.throughput and names else {}
    print(table(folder, speeds))
    print('\n' + schedules(folder))
    os.makedirs(args.figures, exist_ok=True)
    plot(folder, os.path.join(args.figures, 'ablation.png'))
    return 0


if __name__ == '__main__':
    sys.exit(main())
