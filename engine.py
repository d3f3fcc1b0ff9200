"""One training/search epoch and the evaluation loop. Inputs are explicit objects; both return
a metrics dict. main.py wires them, logs and checkpoints."""
import contextlib
import statistics
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from losses import flops_penalty
from utils import MetricLogger, NonFiniteError, all_reduce_sum, unwrap
from workflow.timing import timed


@dataclass
class Precision:
    """Autocast settings: bf16/fp16 on GPU (fp16 with a gradient scaler), fp32 elsewhere."""
    device_type: str
    dtype: Optional[torch.dtype]  # None = no autocast
    scaler: Optional[torch.amp.GradScaler] = None

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


@dataclass
class SearchObjective:
    """Which parameters a step updates and the FLOPs budget they answer to.

    The budget is `target_flops` GFLOPs, or, while annealing, a line from `start_flops` at step 0
    to `target_flops` at step `anneal_steps` (steps counted over the whole run from `first_step`,
    the first step of this epoch).
    """
    mode: str                 # 'alternate' | 'joint' | 'arch' | 'weights'
    target_flops: float       # GFLOPs
    flops_lambda: float       # 0 during the optional compression-rate warm-up
    start_flops: Optional[float] = None
    anneal_steps: int = 0
    first_step: int = 0

    def budget(self, step: int) -> float:
        """GFLOPs budget of step `step` of this epoch."""
        if self.start_flops is None or self.anneal_steps <= 0:
            return self.target_flops
        progress = min(1.0, (self.first_step + step) / self.anneal_steps)
        return self.start_flops + progress * (self.target_flops - self.start_flops)

    def stepped_groups(self, step: int) -> Tuple[str, ...]:
        """Optimizers to step after this step's backward: alternate switches every step, joint
        steps both (the weights then get as many updates as in a plain training run)."""
        if self.mode == 'alternate':
            return ('weights',) if step % 2 == 0 else ('arch',)
        if self.mode == 'joint':
            return ('weights', 'arch')
        return (self.mode,)


def train_one_epoch(model: nn.Module, *, criterion: nn.Module, loader: Iterable, num_steps: int,
                    optimizers: Dict[str, torch.optim.Optimizer], objective: SearchObjective,
                    device: torch.device, precision: Precision, epoch: int,
                    mixup_fn: Optional[Callable] = None, clip_grad: Optional[float] = None,
                    model_ema=None, print_freq: int = 20) -> Dict[str, float]:
    """Weight and/or rate updates over one pass of `loader`; returns epoch averages.

    loss = classification loss + lambda * (flops / 1e9 - target)^2. The first step whose loss is
    NaN/inf is recorded on the device and read by the host only every `print_freq` steps and at
    the end (no per-step sync); then NonFiniteError names that step, before anything is saved.
    Rates gone non-finite raise it at once (their counts are read on the host every step).
    """
    model.train()
    if objective.mode == 'arch':  # frozen weights: batch norms keep their statistics as well
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    core = unwrap(model)
    logger = MetricLogger(f'Epoch [{epoch}]', print_freq)
    loss_sum = torch.zeros((), device=device)
    first_bad = torch.full((), -1, dtype=torch.long, device=device)  # first step with a non-finite loss
    for step, (images, targets) in enumerate(logger.log_every(loader, num_steps)):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            images, targets = mixup_fn(images, targets)
        try:
            with precision.autocast():
                cls_loss = criterion(model(images), targets)
        except FloatingPointError as error:  # the rates' counts are not finite
            raise NonFiniteError(f'{error}, in epoch {epoch} at step {step}') from None
        flops = core.flops()
        loss = cls_loss.float()
        if objective.mode != 'weights':
            loss = loss + flops_penalty(flops, objective.budget(step), objective.flops_lambda)
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)

        groups = objective.stepped_groups(step)
        for optimizer in optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        scaler = precision.scaler
        (scaler.scale(loss) if scaler is not None else loss).backward()
        for group in groups:
            optimizer = optimizers[group]
            if clip_grad:
                if scaler is not None:
                    scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(_params(optimizer), clip_grad)
            if scaler is not None:
                scaler.step(optimizer)
            else:
                optimizer.step()
        if scaler is not None:
            scaler.update()
        if model_ema is not None and 'weights' in groups:
            model_ema.update(core)

        loss_sum += loss.detach()
        if step % print_freq == 0 or step == num_steps - 1:
            bad = int(first_bad)
            if bad >= 0:
                raise NonFiniteError(f'the loss became NaN or infinite in epoch {epoch} at step {bad}')
            logger.update(loss=loss.item(), cls_loss=cls_loss.item(),
                          gflops=flops.item() / 1e9, budget=objective.budget(step),
                          lr=optimizers['weights'].param_groups[0]['lr'] if 'weights' in optimizers else 0.0)
    return {'loss': float(loss_sum) / max(num_steps, 1), 'gflops': float(core.flops().detach()) / 1e9,
            **{k: v for k, v in logger.averages().items() if k not in ('loss', 'gflops')}}


def _params(optimizer: torch.optim.Optimizer) -> List[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group['params']]


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, num_steps: int, num_classes: int, device: torch.device,
             precision: Precision, reduce: bool, print_freq: int = 20) -> Dict:
    """Top-1/top-5, overall accuracy, Cohen's kappa, per-class accuracy, confusion matrix, loss,
    and 'predictions': the top-1 class of every image in loader order (single process), or None.

    reduce: sum the counts over processes (each process saw a disjoint shard of the data).
    """
    model.eval()
    predictions = []
    logger = MetricLogger('Test', print_freq)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)  # [true, predicted]
    top5 = torch.zeros((), dtype=torch.long, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for images, targets in logger.log_every(loader, num_steps):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with precision.autocast():
            logits = model(images)
        loss_sum += nn.functional.cross_entropy(logits.float(), targets, reduction='sum').double()
        ranked = logits.topk(min(5, num_classes), dim=1).indices
        predictions.append(ranked[:, 0])
        top5 += (ranked == targets[:, None]).any(dim=1).sum()
        confusion += torch.bincount(targets * num_classes + ranked[:, 0], minlength=num_classes ** 2) \
            .view(num_classes, num_classes)
    if reduce:
        for tensor in (confusion, top5, loss_sum):
            all_reduce_sum(tensor)
    metrics = confusion_metrics(confusion.cpu(), int(top5), float(loss_sum))
    metrics['predictions'] = None if reduce or not predictions else torch.cat(predictions).tolist()
    return metrics


def confusion_metrics(confusion: torch.Tensor, top5_correct: int, loss_sum: float) -> Dict:
    """Metrics of a confusion matrix [true, predicted] (counts)."""
    confusion = confusion.double()
    total = confusion.sum().item()
    correct = confusion.trace().item()
    observed = correct / total
    chance = float((confusion.sum(0) * confusion.sum(1)).sum()) / total ** 2
    recall = confusion.diagonal() / confusion.sum(1).clamp(min=1)  # [K], the per-class accuracy
    precision = confusion.diagonal() / confusion.sum(0).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=torch.finfo(recall.dtype).tiny)
    return {
        'acc1': 100 * observed, 'acc5': 100 * top5_correct / total, 'overall_accuracy': 100 * observed,
        'kappa': (observed - chance) / (1 - chance) if chance < 1 else 0.0,
        'loss': loss_sum / total, 'num_images': int(total),
        'per_class_recall': (100 * recall).tolist(), 'per_class_precision': (100 * precision).tolist(),
        'per_class_f1': (100 * f1).tolist(), 'confusion_matrix': confusion.long().tolist(),
    }


@torch.no_grad()
def measure_throughput(model: nn.Module, batch_size: int, image_size: int, device: torch.device,
                       precision: Precision, repeats: int = 5, warmup: int = 2) -> float:
    """Images per second of the evaluation forward (median of `repeats` timed batches)."""
    model.eval()
    images = torch.randn(batch_size, unwrap(model).in_chans, image_size, image_size, device=device)

    def forward():
        with precision.autocast():
            model(images)
    for _ in range(warmup):
        forward()
    return batch_size / statistics.median(timed(forward, device) for _ in range(repeats))
