"""EAB: shift-convolution refinement of queries and keys on each image's patch grid.

The shift-conv module (SCM) follows ELAN's local feature extraction: shift channel groups by one
patch (left, right, up, down, identity), 1x1 conv expanding channels by `exp_ratio`, ReLU, shift,
1x1 conv back, residual. It runs on the 2-D patch grid of every image separately. After pruning
and merging, each surviving token is painted onto the patches it owns (pruned patches are zero),
the SCM runs on the grid, and each token takes the mean of its patches' outputs.
"""
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .token_ops import TokenState


def shift_channel_groups(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Shift five channel slices of every group by one pixel, zero filled.

    x: [B, C, H, W] -> [B, C, H, W]. Within each of `groups` channel groups the channels are
    split in five: shifted left, right, up, down, and left in place.
    """
    B, C, H, W = x.shape
    x = x.view(B, groups, C // groups, H, W)
    g = C // groups // 5
    out = torch.zeros_like(x)
    out[:, :, 0 * g:1 * g, :, :-1] = x[:, :, 0 * g:1 * g, :, 1:]   # left
    out[:, :, 1 * g:2 * g, :, 1:] = x[:, :, 1 * g:2 * g, :, :-1]   # right
    out[:, :, 2 * g:3 * g, :-1, :] = x[:, :, 2 * g:3 * g, 1:, :]   # up
    out[:, :, 3 * g:4 * g, 1:, :] = x[:, :, 3 * g:4 * g, :-1, :]   # down
    out[:, :, 4 * g:] = x[:, :, 4 * g:]                            # identity
    return out.view(B, C, H, W)


class ShiftConvModule(nn.Module):
    """SCM: x + conv1(shift(relu(conv0(shift(x))))) on a [B, C, H, W] grid."""

    def __init__(self, dim: int, exp_ratio: float = 2.0, groups: int = 1) -> None:
        super().__init__()
        hidden = int(dim * exp_ratio)
        if dim % groups or hidden % groups or dim // groups < 5:
            raise ValueError(f'EAB: dim {dim} and hidden {hidden} must split into {groups} groups of >= 5 channels')
        self.groups = groups
        self.expand = nn.Conv2d(dim, hidden, kernel_size=1, groups=groups)
        self.reduce = nn.Conv2d(hidden, dim, kernel_size=1, groups=groups)

    def delta(self, grid: torch.Tensor) -> torch.Tensor:
        """The residual branch alone: [B, C, H, W] -> [B, C, H, W]."""
        y = F.relu(self.expand(shift_channel_groups(grid, self.groups)))
        return self.reduce(shift_channel_groups(y, self.groups))

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return grid + self.delta(grid)


class EfficientAttentionShift(nn.Module):
    """Refines q and k, [B, N, C] each, with one SCM apiece on the patch grid."""

    def __init__(self, dim: int, exp_ratio: float = 2.0, groups: int = 1) -> None:
        super().__init__()
        self.scm_q = ShiftConvModule(dim, exp_ratio, groups)
        self.scm_k = ShiftConvModule(dim, exp_ratio, groups)

    def forward(self, q: torch.Tensor, k: torch.Tensor, state: TokenState) -> Tuple[torch.Tensor, torch.Tensor]:
        return self._refine(self.scm_q, q, state), self._refine(self.scm_k, k, state)

    @staticmethod
    def _refine(scm: ShiftConvModule, t: torch.Tensor, state: TokenState) -> torch.Tensor:
        B, N, C = t.shape
        H, W = state.grid_size
        if state.owner is None:  # identity layout: tokens 1..P are the patches in raster order
            grid = t[:, 1:].transpose(1, 2).reshape(B, C, H, W)
            delta = scm.delta(grid).flatten(2).transpose(1, 2)  # [B, P, C]
            return torch.cat([t[:, :1], t[:, 1:] + delta], dim=1)
        owner = state.owner  # [B, P], value N = pruned patch
        padded = torch.cat([t, t.new_zeros(B, 1, C)], dim=1)  # [B, N + 1, C]
        painted = padded.gather(1, owner[..., None].expand(-1, -1, C))  # [B, P, C]
        delta = scm.delta(painted.transpose(1, 2).reshape(B, C, H, W)).flatten(2).transpose(1, 2)
        # Mean of each token's patch outputs; the class token owns no patch and is unchanged.
        summed = padded.new_zeros(B, N + 1, C).scatter_add(1, owner[..., None].expand(-1, -1, C), delta)
        count = padded.new_zeros(B, N + 1, 1).scatter_add(1, owner[..., None], padded.new_ones(B, owner.shape[1], 1))
        return t + (summed / count.clamp(min=1))[:, :N]
