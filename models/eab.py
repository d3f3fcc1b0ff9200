"""EAB: shift-convolution refinement of queries and keys, at a cost that follows the kept tokens.

The shift-conv module (SCM) follows ELAN's local feature extraction: shift channel groups by
`shift` patches (left, right, up, down, identity), 1x1 conv expanding channels by `exp_ratio`,
ReLU, shift, 1x1 conv back, residual. The 1x1 convs are per-token operations and run on the N
tokens that are present (cost 2 * exp_ratio * N * C^2 per SCM); only the shifts use each image's
2-D patch grid: every token is painted onto the patches it owns (pruned patches are zero), the
channel groups move, and every token reads back the mean over its patches. That procedure is a
weighted sum of token rows, built once per compression (GridShift). While no token has been pruned or
merged the grid is the token sequence itself and it is shifted directly. Exported graphs run the
module channels first, q and k side by side ([B, C, 2, N]): there a channel slice is a block of
rows, so neither the shifts nor the 1x1 convs need a transpose.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .token_ops import TokenState
from .tracing import exporting


def moved_slices(moving: torch.Tensor, channel_dim: int, height_dim: int, width_dim: int, shift: int) -> torch.Tensor:
    """The exported graphs' grid shift: `moving` holds four channel slices on channel_dim and a
    grid on (height_dim, width_dim); the slices move left, right, up and down by `shift` patches,
    zero filled. Assembled with cat: writes into slices export as scatters behind full-size
    transposes (docs/benchmark.md, "ONNX export and onnxruntime"). Same shape as moving."""
    g, s = moving.shape[channel_dim] // 4, shift

    def moved(index: int, dim: int, forward: bool) -> torch.Tensor:
        part = moving.narrow(channel_dim, index * g, g)
        kept = part.narrow(dim, s, part.shape[dim] - s) if forward else part.narrow(dim, 0, part.shape[dim] - s)
        zeros = part.new_zeros(part.shape[:dim] + (s,) + part.shape[dim + 1:])
        return torch.cat([kept, zeros] if forward else [zeros, kept], dim=dim)
    return torch.cat([moved(0, width_dim, True), moved(1, width_dim, False), moved(2, height_dim, True),
                      moved(3, height_dim, False)], dim=channel_dim)


def shift_channel_groups(grid: torch.Tensor, groups: int, shift: int) -> torch.Tensor:
    """Shift five channel slices of every group by `shift` patches, zero filled.

    grid: [B, H, W, C] (channels last) -> [B, H, W, C]. Within each of `groups` channel groups
    the channels are split in five: moved left, right, up, down, and left in place.
    """
    B, H, W, C = grid.shape
    x = grid.view(B, H, W, groups, C // groups)
    g, s = C // groups // 5, shift
    out = torch.zeros_like(x)
    out[:, :, :-s, :, 0 * g:1 * g] = x[:, :, s:, :, 0 * g:1 * g]   # left
    out[:, :, s:, :, 1 * g:2 * g] = x[:, :, :-s, :, 1 * g:2 * g]   # right
    out[:, :-s, :, :, 2 * g:3 * g] = x[:, s:, :, :, 2 * g:3 * g]   # up
    out[:, s:, :, :, 3 * g:4 * g] = x[:, :-s, :, :, 3 * g:4 * g]   # down
    out[..., 4 * g:] = x[..., 4 * g:]                              # identity
    return out.view(B, H, W, C)


class GridShift:
    """The SCM's shifts of a block's tokens (B images, N patch tokens, P patches), on each image's
    patch grid.

    Every token is painted onto the patches it owns (pruned patches are zero), the channel slices
    move by `shift` patches, and every token reads back the mean over its patches. For each of the
    four moving slices that is a weighted sum of token rows: token n receives, for each patch p it
    owns, the row of the token that owns the patch `shift` away (none past the edge or where that
    patch is pruned), weighted 1 / (patches of n). These lists are built once per set of [B, P]
    owners (EfficientAttentionShift keeps them until the next compression) and summed with
    `embedding_bag` (one bag per token), so a shift reads about 4/5 * P * C values and does no
    N x N work; the identity slice is the token itself. Exported graphs (ONNX has no
    embedding_bag) apply the same weights as [B, 4, N, N] matrices from the right to channels-first
    tokens instead (`channels_first`). owner None: the identity layout (token p is patch p),
    shifted on the grid directly.
    """

    def __init__(self, grid_size: Tuple[int, int], owner: Optional[torch.Tensor], num_tokens: int,
                 shift: int, groups: int = 1, dtype: torch.dtype = torch.float32) -> None:
        self.grid_size, self.shift_by, self.groups = grid_size, shift, groups
        self.bags: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
        # [B, 4, N, N], exported graphs only: [b, k, m, n] = weight of token m's row in token n's slice k
        self.operator: Optional[torch.Tensor] = None
        if owner is None:
            return
        B, P = owner.shape
        H, W = grid_size
        N, s = num_tokens, shift
        # source[b, k, p]: the token whose slice k patch p receives (k: from the right, left, below,
        # above); N past the grid's edge or for a pruned patch
        padded = F.pad(owner.view(B, 1, H, W), (s, s, s, s), value=N)
        crops = (padded[..., s:-s, 2 * s:], padded[..., s:-s, :-2 * s],
                 padded[..., 2 * s:, s:-s], padded[..., :-2 * s, s:-s])
        source = torch.cat(crops, dim=1).view(B, 4, P)
        counts = torch.zeros(B, N + 1, dtype=torch.long, device=owner.device).scatter_add_(
            1, owner, torch.ones_like(owner))  # [B, N + 1] patches per token (the last: pruned)
        # 1 / patches of its token, 0 for a pruned patch or a source outside the tokens: [B, 4, P]
        weight = ((owner < N).to(dtype) / counts.gather(1, owner))[:, None] * (source < N).to(dtype)
        source = source.clamp(max=N - 1)  # zero weight where clamped
        if exporting():  # a sum over the patches in any order: no sort
            index = source * N + owner.clamp(max=N - 1)[:, None]
            self.operator = torch.zeros(B, 4, N * N, dtype=dtype, device=owner.device).scatter_add_(
                2, index, weight).view(B, 4, N, N)
            return
        # the bags: each token's patches together, in token order, pruned patches (owner N) last
        order = owner.sort(dim=1).indices[:, None].expand(-1, 4, -1)  # [B, 4, P]
        source, weight = source.gather(2, order), weight.gather(2, order)
        first = torch.arange(B, device=owner.device)[:, None]
        counts = counts[:, :N]
        offsets = (first * P + counts.cumsum(1) - counts).flatten()  # [B * N] first patch of each token
        rows = (first[..., None] * N + source).transpose(0, 1).reshape(4, B * P)  # token rows per slice
        # one bag per (group, slice, image, token), in that order, over the rows of the moving
        # slices laid out as [groups, 4, B, N]; pruned patches close the last bag of their image
        # with zero weight
        lane = torch.arange(4 * groups, device=owner.device).view(groups, 4, 1)
        self.bags = ((rows + lane * (B * N)).flatten(), (offsets + lane * (B * P)).flatten(),
                     weight.transpose(0, 1).reshape(4, B * P).repeat(groups, 1).flatten())

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [B, N, C] of the dtype given at construction -> [B, N, C], the channels in
        `groups` groups of five slices each."""
        B, N, C = tokens.shape
        if self.operator is not None:
            raise RuntimeError('a GridShift built under exporting() applies to channels-first tokens: channels_first')
        if self.bags is None:
            H, W = self.grid_size
            return shift_channel_groups(tokens.reshape(B, H, W, C), self.groups, self.shift_by).reshape(B, N, C)
        groups = self.groups
        width = C // groups
        g = width // 5  # channels per slice; the rest of each group stays in place
        rows, offsets, weight = self.bags
        x = tokens.view(B, N, groups, width)
        table = x[..., :4 * g].unflatten(-1, (4, g)).permute(2, 3, 0, 1, 4).reshape(-1, g)  # [groups * 4 * B * N, g]
        moved = F.embedding_bag(rows, table, offsets, mode='sum', per_sample_weights=weight)
        # NOTE two copies into one output rather than a permuted copy and a cat of strided parts
        # (one pass over the data fewer; 10-30% faster per shift, docs/benchmark.md)
        out = torch.empty_like(x)
        out[..., :4 * g].unflatten(-1, (4, g)).copy_(moved.view(groups, 4, B, N, g).permute(2, 3, 0, 1, 4))
        out[..., 4 * g:] = x[..., 4 * g:]
        return out.view(B, N, C)

    def channels_first(self, moving: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
        """The exported graphs' form, on channels-first tokens of S streams sharing the shifts
        (e.g. q and k): moving: [B, groups, 4g, S, N], the four moving slices of every group;
        rest: [B, groups, width - 4g, S, N] -> [B, C, S, N]. In this layout a slice is a block of
        rows, so the shifts need no transposes: each slice of every stream is one product with
        its [N, N] matrix from the right."""
        B, groups, four_g, S, N = moving.shape
        if self.operator is not None:
            moved = moving.reshape(B, groups, 4, four_g // 4 * S, N) @ self.operator[:, None]
        elif self.bags is None:
            H, W = self.grid_size
            moved = moved_slices(moving.view(B, groups, four_g, S, H, W), channel_dim=2, height_dim=4, width_dim=5,
                                 shift=self.shift_by)
        else:
            raise RuntimeError('GridShift.channels_first needs the matrices built under exporting()')
        return torch.cat([moved.view(B, groups, four_g, S, N), rest], dim=2).view(B, -1, S, N)


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
        # 1x1 convolutions, kept as Conv1d parameters ([out, in, 1], the checkpoints' layout); applied by _pointwise
        self.expand = nn.Conv1d(dim, hidden, kernel_size=1, groups=groups)
        self.reduce = nn.Conv1d(hidden, dim, kernel_size=1, groups=groups)
        nn.init.zeros_(self.reduce.weight)
        nn.init.zeros_(self.reduce.bias)

    def delta(self, tokens: torch.Tensor, shift: GridShift) -> torch.Tensor:
        """The residual branch alone: patch tokens [B, N, C] -> [B, N, C]."""
        y = F.relu(self._pointwise(self.expand, shift(tokens)), inplace=True)  # [B, N, hidden], a fresh tensor
        return self._pointwise(self.reduce, shift(y))

    @staticmethod
    def _pointwise(conv: nn.Conv1d, tokens: torch.Tensor) -> torch.Tensor:
        """A 1x1 conv applied to every token, [B, N, C_in] -> [B, N, C_out]: a matrix product on
        the [B, N, C] layout (conv1d would need [B, C, N] and its transposes), grouped: conv1d."""
        if conv.groups == 1:
            return F.linear(tokens, conv.weight.squeeze(-1), conv.bias)
        return conv(tokens.transpose(1, 2)).transpose(1, 2)

    def forward(self, tokens: torch.Tensor, shift: GridShift) -> torch.Tensor:
        return tokens + self.delta(tokens, shift)

    def delta_channels_first(self, tokens: torch.Tensor, shift: GridShift) -> torch.Tensor:
        """The residual branch in the exported graphs' layout: patch tokens [B, C, S, N] (S
        streams) -> [B, C, S, N]; the 1x1 convs are weight @ tokens, no transposes in between."""
        B, C, S, N = tokens.shape
        x = tokens.view(B, self.groups, C // self.groups, S, N)
        moving_in = 4 * (x.shape[2] // 5)  # the four moving slices of each group's channels
        shifted = shift.channels_first(x[:, :, :moving_in], x[:, :, moving_in:])
        # NOTE the expanding conv's moving and resting channels as two products: the second shift
        # then needs no split of the [B, hidden, S, N] map
        moving_hidden = 4 * (self.expand.out_channels // self.groups // 5)
        moving, rest = (F.relu(self._pointwise_channels_first(self.expand, shifted, rows))
                        for rows in (slice(0, moving_hidden), slice(moving_hidden, None)))
        return self._pointwise_channels_first(self.reduce, shift.channels_first(moving, rest)).view(B, C, S, N)

    @staticmethod
    def _pointwise_channels_first(conv: nn.Conv1d, tokens: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        """A 1x1 conv on [B, C_in, S, N] -> [B, groups, len(rows), S, N], the output channels
        `rows` of every group: per group one product of those rows of the weight with the
        group's [C_in / groups, S * N] inputs (all streams in one product)."""
        B, _, S, N = tokens.shape
        groups = conv.groups
        weight = conv.weight.view(groups, conv.out_channels // groups, -1)[:, rows]
        bias = conv.bias.view(groups, -1, 1)[:, rows]
        y = weight @ tokens.reshape(B, groups, -1, S * N) + bias  # [B, groups, rows, S * N]
        return y.view(B, groups, -1, S, N)


# NOTE below this size (bytes) of the stacked hidden activations, q and k pass a shared SCM as one
# batch of 2B: half the operator calls and twice the rows per matrix product, which is what small
# batches are short of. Above it they pass one after the other: at batch 32 the stacked batch ran
# slower (docs/benchmark.md).
STACK_BYTES = 4 << 20


class EfficientAttentionShift(nn.Module):
    """Refines q and k, [B, N, C] each (prefix tokens first, left unchanged), with one SCM shared
    by both (the official code's structure) or one each (`shared=False`)."""

    def __init__(self, dim: int, exp_ratio: float = 2.0, groups: int = 1, shift: int = 2,
                 shared: bool = True) -> None:
        super().__init__()
        self.scm = ShiftConvModule(dim, exp_ratio, groups, shift)  # q's, and k's too unless scm_k is set
        self.scm_k = None if shared else ShiftConvModule(dim, exp_ratio, groups, shift)

    def _grid_shift(self, state: TokenState, num_tokens: int, stacked: bool, dtype: torch.dtype) -> GridShift:
        """The shift lists of num_tokens patch tokens (2B images when stacked), shared by q and k
        and by the blocks that follow until the next compression."""
        scm = self.scm
        key = ('grid_shift', stacked, scm.shift, scm.groups, dtype)
        shift = state.derived.get(key)
        if shift is None:
            owner = None if state.owner is None else state.owner - state.prefix  # [B, P], among the patch tokens
            if stacked and owner is not None:
                owner = owner.repeat(2, 1)  # [2B, P]
            shift = state.derived[key] = GridShift(state.grid_size, owner, num_tokens, scm.shift, scm.groups, dtype)
        return shift

    def forward(self, q: torch.Tensor, k: torch.Tensor, state: TokenState) -> Tuple[torch.Tensor, torch.Tensor]:
        B, N, _ = q.shape
        P, scm_q = state.prefix, self.scm
        stacked_bytes = 2 * B * (N - P) * scm_q.expand.out_channels * q.element_size()
        stacked = self.scm_k is None and stacked_bytes <= STACK_BYTES
        shift = self._grid_shift(state, N - P, stacked, q.dtype)
        if stacked:
            qk = torch.cat([q, k])  # [2B, N, C]
            # nothing keeps qk's values for the backward pass, so the residual may go in place
            qk[:, P:] += scm_q.delta(qk[:, P:], shift)
            return qk[:B], qk[B:]
        scm_k = self.scm_k if self.scm_k is not None else scm_q
        return (torch.cat([q[:, :P], scm_q(q[:, P:], shift)], dim=1),
                torch.cat([k[:, :P], scm_k(k[:, P:], shift)], dim=1))

    def forward_channels_first(self, qk: torch.Tensor, state: TokenState) -> torch.Tensor:
        """The exported graphs' form of forward: q and k channels first, [B, C, 2, N] (prefix
        tokens first along N, left unchanged) -> [B, C, 2, N]. A shared SCM refines both in one pass
        whatever the batch size: half the graph's nodes, and products twice as wide."""
        P = state.prefix
        patches = qk[..., P:]  # [B, C, 2, N - P]
        shift = self._grid_shift(state, patches.shape[-1], False, qk.dtype)
        if self.scm_k is None:
            delta = self.scm.delta_channels_first(patches, shift)
        else:
            delta = torch.cat([self.scm.delta_channels_first(patches[:, :, :1], shift),
                               self.scm_k.delta_channels_first(patches[:, :, 1:], shift)], dim=2)
        return torch.cat([qk[..., :P], patches + delta], dim=-1)
