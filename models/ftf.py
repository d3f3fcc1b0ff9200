"""FTF: second-order (covariance) head on the patch tokens.

Tokens are reduced to `dim` channels (1x1 projection, BN, ReLU), their size-weighted centred
covariance [dim, dim] is square-rooted by the [5/5] Pade approximant of sqrtm.py and its upper
triangle feeds a linear classifier.
"""
from typing import Optional

import torch
from torch import nn

from .sqrtm import pade_sqrtm

RIDGE = 1e-5  # relative ridge added to the covariance before its root (see add_ridge)


def weighted_covariance(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Centred covariance of token features weighted by `weight` (token sizes x keep mask).

    x: [B, N, d], weight: [B, N, 1] (non-negative, not all zero) -> [B, d, d].
    """
    weight = weight / weight.sum(dim=1, keepdim=True)
    centred = x - (x * weight).sum(dim=1, keepdim=True)
    return centred.transpose(1, 2) @ (centred * weight)


def add_ridge(cov: torch.Tensor, eps: float = RIDGE) -> torch.Tensor:
    """cov + eps * (mean eigenvalue + 1) * I, cov: [B, d, d]: keeps the root stable with few tokens."""
    trace = cov.diagonal(dim1=1, dim2=2).sum(-1)[:, None, None]
    return cov + eps * (trace / cov.shape[-1] + 1.0) * torch.eye(cov.shape[-1], device=cov.device, dtype=cov.dtype)


def masked_batch_norm(bn: nn.BatchNorm1d, x: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """Training-mode `bn` over the channels of x: [B, N, d], statistics from tokens where alive: [B, N].

    Normalises, updates the running statistics and counts the batch exactly as `bn(x[alive])`
    would, but every token comes out normalised: a masked token then weighs 0 in the
    covariance yet its own features give the keep mask's straight-through gradient (zeros
    there would ask what keeping an all-zero token changes). Masks instead of boolean indexing
    also avoid a host-device synchronisation per step on GPU.
    """
    weight = alive.to(x.dtype)[..., None]  # [B, N, 1]
    count = weight.sum()
    mean = (x * weight).sum(dim=(0, 1)) / count  # [d]
    centred = x - mean
    var = (centred.square() * weight).sum(dim=(0, 1)) / count  # biased, as BN normalises with
    if bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            momentum = bn.momentum if bn.momentum is not None else 1.0 / bn.num_batches_tracked
            bn.running_mean.lerp_(mean, momentum)
            bn.running_var.lerp_(var * count / (count - 1).clamp(min=1), momentum)  # unbiased
    out = centred * torch.rsqrt(var + bn.eps)
    return out * bn.weight + bn.bias if bn.affine else out


class SecondOrderHead(nn.Module):
    """Patch tokens [B, N, C] -> logits [B, num_classes] through covariance pooling."""

    def __init__(self, embed_dim: int, num_classes: int, dim: int = 48, eps: float = RIDGE) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.reduce = nn.Linear(embed_dim, dim)  # the 1x1 reduction, applied per token
        self.bn = nn.BatchNorm1d(dim)
        rows, cols = torch.triu_indices(dim, dim)
        self.register_buffer('triu_rows', rows, persistent=False)
        self.register_buffer('triu_cols', cols, persistent=False)
        self.num_features = dim * (dim + 1) // 2
        self.reset_classifier(num_classes)

    def reset_classifier(self, num_classes: int) -> None:
        """A new classifier, starting at zero: the model's logits are then the class-token head's
        alone (a pretrained DeiT's, before fine-tuning), and the zero layer still gets gradients."""
        self.fc = nn.Linear(self.num_features, num_classes, device=self.triu_rows.device) if num_classes > 0 \
            else nn.Identity()
        if num_classes > 0:
            nn.init.zeros_(self.fc.weight)
            nn.init.zeros_(self.fc.bias)

    def forward(self, tokens: torch.Tensor, size: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens: [B, N, C] patch tokens; size: [B, N, 1]; mask: [B, N] straight-through keep mask."""
        with torch.autocast(device_type=tokens.device.type, enabled=False):  # features are float32
            return self.fc(self.features(tokens, size, mask))

    def features(self, tokens: torch.Tensor, size: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The pooled second-order features before the classifier: [B, dim * (dim + 1) / 2]."""
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            dtype = torch.promote_types(tokens.dtype, torch.float32)  # float32 or better
            feat = self.reduce(tokens.to(dtype))  # [B, N, d]
            weight = size.to(dtype)
            if mask is None or not self.bn.training:
                feat = self.bn(feat.transpose(1, 2)).transpose(1, 2)
            else:
                # BN statistics from alive tokens only, as evaluation never sees the others.
                feat = masked_batch_norm(self.bn, feat, mask.detach() > 0)
            if mask is not None:
                weight = weight * mask.to(dtype)[..., None]
            root = pade_sqrtm(add_ridge(weighted_covariance(torch.relu(feat), weight), self.eps))
            return root[:, self.triu_rows, self.triu_cols]
