"""Figures generated from run folders: the learned schedule, training curves, the confusion matrix,
accuracy against FLOPs, token groups after pruning and merging, and the pipeline diagram."""
import os
from typing import List, Optional

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from datasets import SceneFolder, build_transform  # noqa: E402
from workflow.runs import eval_metrics, load_trained_model, read_log  # noqa: E402


def run_label(run: str) -> str:
    return os.path.basename(os.path.normpath(run))


def plot_schedule(run: str) -> str:
    """Kept tokens per block after pruning and after merging, against the dense model."""
    last = read_log(run)[-1]
    prune, merge = last['prune_kept_num'], last['merge_kept_num']
    blocks = np.arange(len(prune))
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.bar(blocks - 0.2, prune, width=0.4, label='after pruning', color='#4c72b0')
    ax.bar(blocks + 0.2, merge, width=0.4, label='after merging', color='#dd8452')
    ax.axhline(prune[0], color='grey', linestyle='--', linewidth=1, label=f'dense ({prune[0]})')
    ax.set_xlabel('block')
    ax.set_ylabel('kept tokens (with class token)')
    ax.set_xticks(blocks)
    ax.set_title(f'{run_label(run)}: learned schedule, {last.get("train_gflops", float("nan")):.3f} GFLOPs')
    ax.legend(fontsize=8)
    return save(fig, run, 'schedule.png')


def plot_curves(run: str) -> str:
    """Training loss, validation top-1 and FLOPs per epoch (log.txt)."""
    log = read_log(run)
    epochs = [r['epoch'] for r in log]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    axes[0].plot(epochs, [r['train_loss'] for r in log], marker='o')
    axes[0].set_title('training loss')
    axes[1].plot(epochs, [r['test_acc1'] for r in log], marker='o', color='#55a868')
    axes[1].set_title('validation top-1 (%)')
    axes[2].plot(epochs, [r['train_gflops'] for r in log], marker='o', color='#c44e52')
    axes[2].set_title('GFLOPs')
    for ax in axes:
        ax.set_xlabel('epoch')
    fig.suptitle(run_label(run))
    return save(fig, run, 'curves.png')


def plot_confusion(run: str) -> str:
    """Row-normalised confusion matrix with class names (eval/eval_metrics.json)."""
    metrics = eval_metrics(run)
    matrix = np.array(metrics['confusion_matrix'], dtype=float)
    matrix = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    names = metrics['class_names']
    size = max(5, 0.22 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(matrix, cmap='Blues', vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    ax.set_yticks(range(len(names)), names, fontsize=6)
    ax.set_xlabel('predicted')
    ax.set_ylabel('true')
    ax.set_title(f'{run_label(run)}: top-1 {metrics["acc1"]:.1f}%, kappa {metrics["kappa"]:.3f}')
    fig.colorbar(image, ax=ax, fraction=0.03)
    return save(fig, run, 'confusion_matrix.png')


def plot_pareto(runs: List[str], out_dir: str) -> str:
    """Top-1 against GFLOPs, one point per evaluated run."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for run in runs:
        metrics = eval_metrics(run)
        ax.scatter(metrics['gflops'], metrics['acc1'], s=40)
        ax.annotate(run_label(run), (metrics['gflops'], metrics['acc1']), fontsize=7,
                    xytext=(4, 4), textcoords='offset points')
    ax.set_xlabel('GFLOPs (analytic, per image)')
    ax.set_ylabel('validation top-1 (%)')
    ax.set_title('accuracy against FLOPs')
    ax.grid(alpha=0.3)
    return save(fig, out_dir, 'accuracy_vs_flops.png')


def plot_token_groups(run: str, data_path: str, num_images: int = 4, depths: Optional[List[int]] = None) -> str:
    """ToMe-style: patches that share a token share a colour; pruned patches are grey."""
    model, args = load_trained_model(os.path.join(run, 'checkpoint.pth'))
    val = SceneFolder(os.path.join(data_path, 'val'), transform=build_transform(False, args))
    picks = np.linspace(0, len(val) - 1, num_images).astype(int)
    images = torch.stack([val[i][0] for i in picks])
    titles = [val.classes[val[i][1]] for i in picks]
    fig = token_groups_figure(model, images, titles, depths)
    fig.suptitle(f'{run_label(run)}: token groups (shared colour = merged, grey = pruned)', fontsize=9)
    return save(fig, run, 'token_groups.png')


def token_groups_figure(model, images: torch.Tensor, titles: List[str], depths: Optional[List[int]] = None):
    """One row per image [B, 3, H, W] (normalised as for the model): the image, then its patches
    coloured by the token they belong to after each block of `depths` (grey: pruned)."""
    depth = len(model.blocks)
    depths = depths or [depth // 4, depth // 2, 3 * depth // 4, depth]
    with torch.no_grad():
        _, _, owners = model.forward_tokens(images, return_owners=True)
    grid_h, grid_w = model.patch_embed.grid_size
    mean = torch.tensor(model.pretrained_cfg.get('mean', (0.485, 0.456, 0.406)))[:, None, None]
    std = torch.tensor(model.pretrained_cfg.get('std', (0.229, 0.224, 0.225)))[:, None, None]
    tokens_after = model.get_kept_num()[1]  # tokens alive after each block; owner == that = pruned
    rng = np.random.default_rng(0)
    fig, axes = plt.subplots(len(images), len(depths) + 1, figsize=(2.2 * (len(depths) + 1), 2.2 * len(images)))
    axes = np.atleast_2d(axes)
    for row, image in enumerate(images):
        rgb = (image.cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
        axes[row, 0].imshow(rgb)
        axes[row, 0].set_title(titles[row], fontsize=7)
        for col, block in enumerate(depths, start=1):
            owner = owners[block - 1][row].cpu().numpy()  # [P] token index of every patch
            pruned = tokens_after[block - 1]
            colours = rng.uniform(0.15, 1.0, size=(pruned + 1, 3))
            colours[pruned] = 0.5  # grey
            tile = colours[owner].reshape(grid_h, grid_w, 3)
            cell_h, cell_w = rgb.shape[0] // grid_h, rgb.shape[1] // grid_w
            tile = np.kron(tile, np.ones((cell_h, cell_w, 1)))
            axes[row, col].imshow(0.45 * rgb[:tile.shape[0], :tile.shape[1]] + 0.55 * tile)
            axes[row, col].set_title(f'after block {block}: {pruned - model.num_prefix_tokens} patch tokens', fontsize=7)
    for ax in axes.flat:
        ax.axis('off')
    return fig


def plot_pipeline(out_dir: str) -> str:
    """The architecture: patch embedding, blocks with EAB and DTC, and the two heads (FTF)."""
    fig, ax = plt.subplots(figsize=(12, 3.6))
    ax.set_xlim(0, 12)
    ax.set_ylim(0, 3.6)
    ax.axis('off')

    def box(x, y, w, h, text, colour):
        ax.add_patch(matplotlib.patches.FancyBboxPatch((x, y), w, h, boxstyle='round,pad=0.04',
                                                       facecolor=colour, edgecolor='black', linewidth=0.8))
        ax.text(x + w / 2, y + h / 2, text, ha='center', va='center', fontsize=7.5)

    def arrow(x0, y0, x1, y1):
        ax.annotate('', (x1, y1), (x0, y0), arrowprops=dict(arrowstyle='->', linewidth=0.9))

    box(0.1, 1.4, 1.1, 0.8, 'image\n224 x 224', '#eeeeee')
    box(1.5, 1.4, 1.2, 0.8, 'patch embed\n+ class token\n197 tokens', '#dddddd')
    ax.add_patch(matplotlib.patches.Rectangle((3.0, 0.35), 5.3, 2.95, fill=False, linestyle='--', linewidth=0.8))
    ax.text(5.65, 3.4, 'block l = 1..L-1 (block 0: dense)', ha='center', fontsize=8)
    box(3.15, 1.4, 0.75, 0.8, 'LN', '#f2f2f2')
    box(4.05, 2.05, 1.35, 0.9, 'EAB: shift-conv on\nq, k per image\non the patch grid', '#c6dbef')
    box(4.05, 0.6, 1.35, 0.9, 'attention\n+ log(size)\n(mask in training)', '#c6dbef')
    box(5.6, 1.4, 1.3, 0.8, 'DTC: sort by\nclass attention,\nprune, merge', '#fdd0a2')
    box(7.05, 1.4, 1.1, 0.8, 'LN + MLP', '#f2f2f2')
    ax.text(6.25, 0.6, 'kept counts: E[candidates]\nceil + straight-through,\nnon-increasing', ha='center',
            fontsize=6.5)
    box(8.6, 2.15, 1.5, 0.8, 'class token\nlinear head', '#c7e9c0')
    box(8.6, 0.55, 1.5, 1.15, 'FTF: patch tokens\n1x1 -> 48, BN, ReLU\nsize-weighted cov.\nPade sqrt, triu', '#c7e9c0')
    box(10.4, 1.4, 1.0, 0.8, 'sum\n-> logits', '#eeeeee')
    arrow(1.2, 1.8, 1.5, 1.8)
    arrow(2.7, 1.8, 3.15, 1.8)
    arrow(3.9, 1.9, 4.05, 2.4)
    arrow(4.7, 2.05, 4.7, 1.5)
    arrow(5.4, 1.1, 5.6, 1.6)
    arrow(6.9, 1.8, 7.05, 1.8)
    arrow(8.15, 1.9, 8.6, 2.5)
    arrow(8.15, 1.7, 8.6, 1.2)
    arrow(10.1, 2.5, 10.4, 2.0)
    arrow(10.1, 1.2, 10.4, 1.6)
    ax.set_title('SDT2Net: DeiT + EAB (efficient attention) + DTC (differentiable token compression) '
                 '+ FTF (second-order head)', fontsize=9)
    return save(fig, out_dir, 'pipeline.png')


def save(fig, out_dir: str, name: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
