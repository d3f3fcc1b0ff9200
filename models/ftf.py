"""FTF: second-order (covariance) head on the patch tokens, with a Pade matrix square root.

Tokens are reduced to `dim` channels (1x1 projection, BN, ReLU), their size-weighted centred
covariance [dim, dim] is square-rooted by a [5/5] Pade approximant (matrix Pade approximants of
Song et al., "Fast differentiable matrix square root", ICLR 2022) and its upper triangle feeds a
linear classifier. Everything runs in float32 or better, also under autocast.
"""
from functools import lru_cache
from typing import Optional, Tuple

import numpy as np
import torch
from torch import nn

POWER_ITERATIONS = 4  # matrix-vector products to estimate the largest eigenvalue (more do not help accuracy)


@lru_cache(maxsize=None)
def pade_coefficients(m: int = 5, n: int = 5) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Coefficients (p, q) of the [m/n] Pade approximant of sqrt(1 - z) = P(z) / Q(z), q[0] = 1.

    Derived in float64 from the binomial series of (1 - z)^(1/2).
    """
    taylor = np.zeros(m + n + 1)
    taylor[0] = 1.0
    for k in range(1, m + n + 1):
        taylor[k] = taylor[k - 1] * (k - 1.5) / k
    # Q's coefficients q1..qn cancel the series terms of order m+1..m+n in Q(z) * T(z) - P(z).
    system = np.array([[taylor[k - j] if k - j >= 0 else 0.0 for j in range(1, n + 1)]
                       for k in range(m + 1, m + n + 1)])
    q = np.concatenate([[1.0], np.linalg.solve(system, -taylor[m + 1:m + n + 1])])
    p = np.array([sum(q[j] * taylor[k - j] for j in range(0, min(k, n) + 1)) for k in range(m + 1)])
    return tuple(p.tolist()), tuple(q.tolist())


def largest_eigenvalue(a: torch.Tensor, iterations: int = POWER_ITERATIONS) -> torch.Tensor:
    """Power-iteration estimate of the largest eigenvalue of symmetric PSD a: [B, d, d] -> [B, 1, 1].

    A fixed number of steps from a fixed start keeps it a smooth (differentiable) function of a.
    """
    v = torch.ones(a.shape[0], a.shape[-1], 1, dtype=a.dtype, device=a.device)
    for _ in range(iterations):
        v = a @ v
        v = v / v.norm(dim=1, keepdim=True).clamp(min=torch.finfo(a.dtype).tiny)
    return (v.transpose(1, 2) @ (a @ v)).clamp(min=torch.finfo(a.dtype).tiny)


def pade_sqrtm(a: torch.Tensor, degree: int = 5) -> torch.Tensor:
    """Square root of symmetric positive semi-definite matrices, a: [B, d, d].

    sqrt(A) = sqrt(s) * Q(Z)^-1 P(Z) with Z = I - A / s. s estimates the largest eigenvalue, so
    that the eigenvalues of Z lie near [0, 1) where the approximant is accurate (the Frobenius
    norm, a looser bound, pushes them towards 1 and costs a 3e-3 relative error at 48 x 48).
    """
    p, q = pade_coefficients(degree, degree)
    scale = largest_eigenvalue(a)
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    z = eye - a / scale
    numerator = torch.add(p[0] * eye, z, alpha=p[1])
    denominator = torch.add(q[0] * eye, z, alpha=q[1])
    power = z
    for k in range(2, degree + 1):
        power = power @ z
        numerator = torch.add(numerator, power, alpha=p[k])
        denominator = torch.add(denominator, power, alpha=q[k])
    return torch.linalg.solve(denominator, numerator) * scale.sqrt()


def eigh_sqrtm(a: torch.Tensor) -> torch.Tensor:
    """Reference square root by eigendecomposition (tests and benchmarks), a: [B, d, d]."""
    values, vectors = torch.linalg.eigh(a)
    return vectors @ torch.diag_embed(values.clamp(min=0).sqrt()) @ vectors.transpose(-1, -2)


def weighted_covariance(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Centred covariance of token features weighted by `weight` (token sizes x keep mask).

    x: [B, N, d], weight: [B, N, 1] (non-negative, not all zero) -> [B, d, d].
    """
    weight = weight / weight.sum(dim=1, keepdim=True)
    centred = x - (x * weight).sum(dim=1, keepdim=True)
    return centred.transpose(1, 2) @ (centred * weight)


class SecondOrderHead(nn.Module):
    """Patch tokens [B, N, C] -> logits [B, num_classes] through covariance pooling."""

    def __init__(self, embed_dim: int, num_classes: int, dim: int = 48, eps: float = 1e-5) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.reduce = nn.Linear(embed_dim, dim)  # the 1x1 reduction, applied per token
        self.bn = nn.BatchNorm1d(dim)
        rows, cols = torch.triu_indices(dim, dim)
        self.register_buffer('triu_rows', rows, persistent=False)
        self.register_buffer('triu_cols', cols, persistent=False)
        self.fc = nn.Linear(dim * (dim + 1) // 2, num_classes) if num_classes > 0 else nn.Identity()

    def reset_classifier(self, num_classes: int) -> None:
        device = self.triu_rows.device
        self.fc = nn.Linear(self.dim * (self.dim + 1) // 2, num_classes, device=device) if num_classes > 0 else nn.Identity()

    def forward(self, tokens: torch.Tensor, size: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens: [B, N, C] patch tokens; size: [B, N, 1]; mask: [B, N] straight-through keep mask."""
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            dtype = torch.promote_types(tokens.dtype, torch.float32)  # float32 or better
            feat = self.reduce(tokens.to(dtype))  # [B, N, d]
            weight = size.to(dtype)
            if mask is None:
                feat = self.bn(feat.transpose(1, 2)).transpose(1, 2)
            else:
                # BN statistics from alive tokens only, as evaluation never sees the others.
                alive = mask.detach() > 0
                normed = feat.new_zeros(feat.shape)
                normed[alive] = self.bn(feat[alive])
                feat = normed
                weight = weight * mask.to(dtype)[..., None]
            cov = weighted_covariance(torch.relu(feat), weight)
            trace = cov.diagonal(dim1=1, dim2=2).sum(-1)[:, None, None]
            eye = torch.eye(self.dim, device=cov.device, dtype=cov.dtype)
            cov = cov + self.eps * (trace / self.dim + 1.0) * eye  # keeps the root stable with few tokens
            root = pade_sqrtm(cov)
            return self.fc(root[:, self.triu_rows, self.triu_cols])
