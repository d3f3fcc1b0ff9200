"""EAB: shift-convolution refinement of queries and keys, at a cost that follows the kept tokens.

The shift-conv module (SCM) follows ELAN's local feature extraction: shift channel groups by
`shift` patches (left, right, up, down, identity), 1x1 conv expanding channels by `exp_ratio`,
ReLU, shift, 1x1 conv back, residual. The 1x1 convs are per-token operations and run on the N
tokens that are present (cost 2 * exp_ratio * N * C^2 per SCM); only the shifts use each image's
2-D patch grid: every token is painted onto the patches it owns (pruned patches are zero), the
channel groups move, and every token reads back the mean over its patches. While no token has
been pruned or merged the grid is the token sequence itself and nothing is painted.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .token_ops import TokenState
from .tracing import tracing


def shift_channel_groups(grid: torch.Tensor, groups: int, shift: int) -> torch.Tensor:
    """Shift five channel slices of every group by `shift` patches, zero filled.

    grid: [B, H, W, C] (channels last) -> [B, H, W, C]. Within each of `groups` channel groups
    the channels are split in five: moved left, right, up, down, and left in place.
    """
    B, H, W, C = grid.shape
    x = grid.view(B, H, W, groups, C // groups)
    g, s = C // groups // 5, shift
    if tracing():
        # NOTE the same shifts without writes into slices, which an exported graph turns into
        # scatters behind full-size transposes (half of onnxruntime's time at batch 32).
        def moved(channels: slice, dim: int, forward: bool) -> torch.Tensor:
            part = x[..., channels]
            kept = part.narrow(dim, s, part.shape[dim] - s) if forward else part.narrow(dim, 0, part.shape[dim] - s)
            zeros = part.new_zeros(part.shape[:dim] + (s,) + part.shape[dim + 1:])
            return torch.cat([kept, zeros] if forward else [zeros, kept], dim=dim)
        out = torch.cat([moved(slice(0, g), 2, True), moved(slice(g, 2 * g), 2, False),
                         moved(slice(2 * g, 3 * g), 1, True), moved(slice(3 * g, 4 * g), 1, False),
                         x[..., 4 * g:]], dim=-1)
        return out.reshape(B, H, W, C)
    out = torch.zeros_like(x)
    out[:, :, :-s, :, 0 * g:1 * g] = x[:, :, s:, :, 0 * g:1 * g]   # left
    out[:, :, s:, :, 1 * g:2 * g] = x[:, :, :-s, :, 1 * g:2 * g]   # right
    out[:, :-s, :, :, 2 * g:3 * g] = x[:, s:, :, :, 2 * g:3 * g]   # up
    out[:, s:, :, :, 3 * g:4 * g] = x[:, :-s, :, :, 3 * g:4 * g]   # down
    out[..., 4 * g:] = x[..., 4 * g:]                              # identity
    return out.view(B, H, W, C)


class PatchGrid:
    """Moves token features to each image's patch grid, shifts them, and back (B batch, N tokens,
    P patches).

    owner: [B, P] index of the token (among the N patch tokens) that owns each patch, N for a
    pruned patch; None for the identity layout (token p is patch p), where nothing is painted.
    """

    def __init__(self, grid_size: Tuple[int, int], owner: Optional[torch.Tensor], num_tokens: int,
                 shift: int) -> None:
        self.grid_size, self.owner, self.shift_by = grid_size, owner, shift
        if owner is None:
            return
        B, P = owner.shape
        H, W = grid_size
        # source[b, p, k]: the token whose feature patch p receives in channel slice k after the
        # shift (k: left, right, up, down, identity); N (a zero row) past the grid's edge or for a
        # pruned patch. Built once per block from the [B, P] owners, shared by q, k and both shifts.
        padded = F.pad(owner.view(B, 1, H, W).float(), (shift, shift, shift, shift), value=num_tokens)
        s = shift
        crops = (padded[..., s:-s, 2 * s:], padded[..., s:-s, :-2 * s],   # from the right / left
                 padded[..., 2 * s:, s:-s], padded[..., :-2 * s, s:-s],   # from below / above
                 padded[..., s:-s, s:-s])
        self.source = torch.cat(crops, dim=1).long().view(B, 5, P).transpose(1, 2)[..., None]  # [B, P, 5, 1]
        ones = torch.ones(B, P, 1, dtype=torch.float32, device=owner.device)
        count = ones.new_zeros(B, num_tokens + 1, 1).scatter_add_(1, owner[..., None], ones)
        self.count = count.clamp_(min=1)  # [B, N + 1, 1] patches per token (the last row: pruned)

    def shift(self, tokens: torch.Tensor, groups: int) -> torch.Tensor:
        """tokens: [B, N, C] -> [B, N, C], each the mean of its patches after the grid shift."""
        B, N, C = tokens.shape
        H, W = self.grid_size
        if self.owner is None:
            return shift_channel_groups(tokens.reshape(B, H, W, C), groups, self.shift_by).reshape(B, N, C)
        g = C // groups // 5  # channels per slice; the rest of each group stays in place
        padded = torch.cat([tokens, tokens.new_zeros(B, 1, C)], dim=1).view(B, N + 1, groups, C // groups)
        owner = self.owner[:, :, None, None]
        # one gather paints and shifts: out[b, p, j, k, c] = tokens[b, source[b, p, k], j, k * g + c]
        moved = padded[..., :5 * g].unflatten(-1, (5, g))  # a view
        shifted = moved.gather(1, self.source[:, :, None].expand(B, H * W, groups, 5, g)).flatten(-2)
        rest = padded[..., 5 * g:]  # channels left over by the five-way split stay in place
        rest_index = self.source[:, :, None, 4].expand(B, H * W, groups, rest.shape[-1])  # identity source
        if tracing():
            # NOTE one scatter into a new tensor: exported graphs turn writes into channel slices
            # into scatters behind full-size transposes (in eager mode the slices are 8% faster)
            painted = torch.cat([shifted, rest.gather(1, rest_index)], dim=-1)  # [B, P, groups, C / groups]
            summed = tokens.new_zeros(B, N + 1, groups, C // groups).scatter_add_(
                1, owner.expand(-1, -1, groups, C // groups), painted)
        else:
            summed = tokens.new_zeros(B, N + 1, groups, C // groups)
            summed[..., :5 * g].scatter_add_(1, owner.expand(-1, -1, groups, 5 * g), shifted)
            if rest.shape[-1]:
                summed[..., 5 * g:].scatter_add_(1, owner.expand(-1, -1, groups, rest.shape[-1]),
                                                 rest.gather(1, rest_index))
        return (summed.view(B, N + 1, C) / self.count.to(summed.dtype))[:, :N]


class ShiftConvModule(nn.Module):
    """SCM on patch tokens: t + reduce(shift(relu(expand(shift(t))))), the shifts on the grid.

    The last conv starts at zero, so that the module starts as the identity (a pretrained
    attention is unchanged until fine-tuning moves it).
    """

    def __init__(self, dim: int, exp_ratio: float = 2.0, groups: int = 1, shift: int = 2) -> None:
        super().__init__()
        hidden = int(dim * exp_ratio)
        if dim % groups or hidden % groups or dim // groups < 5:
            raise ValueError(f'EAB: dim {dim} and hidden {hidden} must split into {groups} groups of >= 5 channels')
        if shift < 1:
            raise ValueError(f'EAB: the shift must be at least 1 patch, got {shift}')
        self.groups = groups
        self.shift = shift
        # 1x1 convolutions over tokens, [B, C, N] layout
        self.expand = nn.Conv1d(dim, hidden, kernel_size=1, groups=groups)
        self.reduce = nn.Conv1d(hidden, dim, kernel_size=1, groups=groups)
        nn.init.zeros_(self.reduce.weight)
        nn.init.zeros_(self.reduce.bias)

    def delta(self, tokens: torch.Tensor, grid: PatchGrid) -> torch.Tensor:
        """The residual branch alone: patch tokens [B, N, C] -> [B, N, C]."""
        y = F.relu(self._pointwise(self.expand, grid.shift(tokens, self.groups)))  # [B, N, hidden]
        return self._pointwise(self.reduce, grid.shift(y, self.groups))

    @staticmethod
    def _pointwise(conv: nn.Conv1d, tokens: torch.Tensor) -> torch.Tensor:
        """A 1x1 conv applied to every token, [B, N, C_in] -> [B, N, C_out].
        NOTE conv1d, not F.linear: on the CPU its oneDNN kernel ran the compressed DeiT-S 7% faster
        at batch 32 (and 6% slower at batch 1; docs/benchmark.md). Exported graphs take the matrix
        product: ONNX's Conv needs [B, C, N], and onnxruntime copies every transpose."""
        if tracing() and conv.groups == 1:
            return F.linear(tokens, conv.weight.squeeze(-1), conv.bias)
        return conv(tokens.transpose(1, 2)).transpose(1, 2)

    def forward(self, tokens: torch.Tensor, grid: PatchGrid) -> torch.Tensor:
        return tokens + self.delta(tokens, grid)


class EfficientAttentionShift(nn.Module):
    """Refines q and k, [B, N, C] each (class token first, left unchanged), with one SCM shared
    by both (the official code's structure) or one each (`shared=False`)."""

    def __init__(self, dim: int, exp_ratio: float = 2.0, groups: int = 1, shift: int = 2,
                 shared: bool = True) -> None:
        super().__init__()
        self.scm_q = ShiftConvModule(dim, exp_ratio, groups, shift)
        self.scm_k = None if shared else ShiftConvModule(dim, exp_ratio, groups, shift)

    def forward(self, q: torch.Tensor, k: torch.Tensor, state: TokenState) -> Tuple[torch.Tensor, torch.Tensor]:
        B = q.shape[0]
        owner = None if state.owner is None else state.owner - 1  # [B, P], among the patch tokens
        if self.scm_k is None:  # one SCM: q and k run as one batch of 2B sequences
            both = torch.cat([q, k], dim=0)
            grid = PatchGrid(state.grid_size, None if owner is None else owner.repeat(2, 1), both.shape[1] - 1,
                             self.scm_q.shift)
            refined = torch.cat([both[:, :1], self.scm_q(both[:, 1:], grid)], dim=1)
            return refined[:B], refined[B:]
        grid = PatchGrid(state.grid_size, owner, q.shape[1] - 1, self.scm_q.shift)
        return (torch.cat([q[:, :1], self.scm_q(q[:, 1:], grid)], dim=1),
                torch.cat([k[:, :1], self.scm_k(k[:, 1:], grid)], dim=1))
