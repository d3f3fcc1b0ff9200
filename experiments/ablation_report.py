"""Tables and figure of experiments/ablation.sh: per row (DeiT + DTC, + EAB, + FTF, + EAB + FTF) the
searched schedule's GFLOPs and tokens, parameters, CPU throughput measured side by side, top-1 on
test/ per seed with mean +- sd, and the paired difference to DeiT + DTC; per model with EAB, how far
fine-tuning moved its EABs from zero and what they add (the model minus its EAB knockout).

    python -m experiments.ablation_report [OUT] [--figure figures/ablation.png] [--throughput]
"""
import json
import os
import sys

import matplotlib
import torch

from utils import ArgumentParser, error_boundary
from models.checkpoint import eab_last_conv_rms
from workflow.runs import load_checkpoint, load_trained_model, model_state, seed_runs
from workflow.stats import compare_files, summarise
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


def eab_moved(folder: str) -> str:
    """Per model with EAB: the RMS of its EABs' last convolutions (zero before fine-tuning; mean and
    range over blocks) and its top-1 minus the same model's with those convolutions at zero."""
    lines = ['| row | seed | EAB last-conv RMS, mean (min-max over blocks) | top-1 (%) | EABs at zero | '
             'minus EABs at zero [95% CI], McNemar p |', '|---|---|---|---|---|---|']
    runs = seed_runs(folder)
    for name, label in ROWS:
        for seed in sorted(runs.get(name, {})):
            run = os.path.join(folder, f'{name}_seed{seed}')
            knocked = os.path.join(run, 'eval_no_eab', 'predictions.csv')
            if not os.path.isfile(knocked):
                continue
            path = os.path.join(run, 'checkpoint.pth')
            rms = list(eab_last_conv_rms(model_state(load_checkpoint(path), path)).values())
            c = compare_files(os.path.join(run, 'eval', 'predictions.csv'), knocked)
            lines.append(f'| {label} | {seed} | {sum(rms) / len(rms):.1e} ({min(rms):.1e}-{max(rms):.1e}) | '
                         f'{c["acc_a"]:.2f} | {c["acc_b"]:.2f} | {c["difference"]:+.2f} [{c["ci_low"]:+.2f}, '
                         f'{c["ci_high"]:+.2f}], {c["mcnemar_p"]:.2g} |')
    return '\n'.join(lines) if len(lines) > 2 else ''


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
    parser.add_argument('--figure', default='figures/ablation.png', help='where the figure goes')
    parser.add_argument('--throughput', action='store_true', help='also measure each row (needs a quiet machine)')
    args = parser.parse_args(argv)
    folder = os.path.join(args.out, 'ablation')
    names = [name for name, _ in ROWS if os.path.isdir(os.path.join(folder, f'{name}_seed0'))]
    speeds = throughput(folder, names) if args.throughput and names else {}
    print(table(folder, speeds))
    print('\n' + schedules(folder))
    moved = eab_moved(folder)
    if moved:
        print('\n' + moved)
    os.makedirs(os.path.dirname(args.figure) or '.', exist_ok=True)
    plot(folder, args.figure)
    return 0


if __name__ == '__main__':
    sys.exit(main())
