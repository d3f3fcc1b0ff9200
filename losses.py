"""Training objectives: classification loss (timm) and the FLOPs-budget penalty."""
import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn


def build_criterion(mixup_active: bool, smoothing: float) -> nn.Module:
    """DeiT's choice: soft-target CE under mixup/cutmix (smoothing is folded into the targets),
    label-smoothing CE otherwise."""
    if mixup_active:
        return SoftTargetCrossEntropy()
    if smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=smoothing)
    return nn.CrossEntropyLoss()


def flops_penalty(flops: torch.Tensor, target_flops: float, flops_lambda: float) -> torch.Tensor:
    """flops_lambda * (flops / 1e9 - target_flops)^2, the budget term of SDT2Net / DiffRate
    (flops in FLOPs, target_flops in GFLOPs)."""
    return flops_lambda * (flops / 1e9 - target_flops) ** 2
