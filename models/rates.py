"""Learnable kept-token counts (DiffRate-style differentiable compression rates).

Every block but the first owns two distributions over candidate numbers of kept patch tokens,
one for pruning and one for merging. The kept count is the expectation under the distribution,
ceiled with a straight-through estimator, and never increases with depth.
"""
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn


def ste_ceil(x: torch.Tensor) -> torch.Tensor:
    """ceil(x) in the forward pass, identity gradient in the backward pass."""
    return x + (torch.ceil(x) - x).detach()


class CompressionRates(nn.Module):
    """Prune and merge kept counts of blocks 1..depth-1, as learnable distributions.

    Rows of `logits` interleave the stages in execution order: prune(1), merge(1), prune(2), ...
    Counts are numbers of *patch* tokens inside the module; the public API adds the class token.
    """

    def __init__(self, depth: int, num_patches: int, granularity: int = 4) -> None:
        super().__init__()
        if granularity < 1:
            raise ValueError(f'granularity must be >= 1, got {granularity}')
        self.depth = depth
        self.num_patches = num_patches
        self.num_stages = 2 * (depth - 1)
        candidates = torch.arange(num_patches, 0, -granularity, dtype=torch.float32)  # [K]: N, N-g, ...
        self.register_buffer('candidates', candidates, persistent=False)
        # keeps_position[j, k] = 1 if sorted position j (0 = class token) survives with candidate k.
        positions = torch.arange(num_patches + 1, dtype=torch.float32)
        self.register_buffer('keeps_position', (positions[:, None] <= candidates[None]).float(), persistent=False)
        self.register_buffer('positions', positions, persistent=False)
        # NOTE zeros = uniform distribution, as DiffRate starts its search.
        self.logits = nn.Parameter(torch.zeros(self.num_stages, len(candidates)))
        # Kept patch count fixed by set_kept_num (-1: learned). Stored in checkpoints.
        self.register_buffer('fixed', torch.full((self.num_stages,), -1, dtype=torch.long))
        self._cache: Optional[Tuple[tuple, torch.Tensor, List[int]]] = None  # key, counts on device, on host

    @property
    def is_fixed(self) -> bool:
        return bool((self.fixed >= 0).all())

    def stage_patches(self) -> torch.Tensor:
        """Kept patch count of every stage, [2 * (depth - 1)], integer-valued, differentiable.

        Forward values are ceil(E[count]) chained by a running minimum; gradients flow to the
        logits through the expectation (straight-through).
        """
        expected = self.logits.softmax(dim=-1) @ self.candidates  # [S]
        counts = ste_ceil(expected)
        counts = torch.where(self.fixed >= 0, self.fixed.to(counts.dtype), counts)
        return torch.cummin(counts, dim=0).values

    def _hard_counts(self) -> Tuple[torch.Tensor, List[int]]:
        """stage_patches() without gradient, [S] on the device and as a host list (one host sync;
        cached while the parameters and the fixed schedule are unchanged)."""
        key = (self.logits._version, self.fixed._version, self.logits.data_ptr(), self.fixed.data_ptr())
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                counts = self.stage_patches()
            self._cache = (key, counts, [int(round(c)) for c in counts.float().tolist()])
        return self._cache[1], self._cache[2]

    def hard_stage_patches(self) -> List[int]:
        """Integer kept patch counts of every stage."""
        return list(self._hard_counts()[1])

    def token_masks(self) -> torch.Tensor:
        """Straight-through keep masks over sorted positions, [S, N + 1].

        Forward: 1 for positions <= kept count (position 0 is the class token), else 0.
        Backward: gradient of P(position kept) = sum of probabilities of candidates >= position.
        The counts are hard_stage_patches' own device tensor: copying the host's list over would
        synchronise the GPU in every training step.
        """
        counts = self._hard_counts()[0]  # [S], integer-valued
        hard = (self.positions[None] <= counts[:, None]).to(self.logits.dtype)  # [S, N+1]
        soft = self.logits.softmax(dim=-1) @ self.keeps_position.T.to(self.logits.dtype)  # [S, N+1]
        soft = torch.where((self.fixed >= 0)[:, None], hard, soft)
        return hard + soft - soft.detach()

    def set_kept_num(self, prune: Sequence[int], merge: Sequence[int]) -> None:
        """Fix the schedule; counts include the class token, one per block (block 0 is dense)."""
        full = self.num_patches + 1
        for name, counts in (('prune', prune), ('merge', merge)):
            if len(counts) != self.depth:
                raise ValueError(f'{name} schedule has {len(counts)} entries, the model has {self.depth} blocks')
            if int(counts[0]) != full:
                raise ValueError(f'{name} schedule must keep all {full} tokens in block 0, got {counts[0]}')
            bad = [c for c in counts if not 2 <= int(c) <= full]
            if bad:
                raise ValueError(f'{name} kept counts must lie in [2, {full}], got {bad}')
        stages = [int(c) - 1 for pair in zip(prune[1:], merge[1:]) for c in pair]
        self.fixed.copy_(torch.tensor(stages, dtype=torch.long))

    def release(self) -> None:
        """Return to the learned schedule (undo set_kept_num)."""
        self.fixed.fill_(-1)

    def kept_num(self) -> Tuple[List[int], List[int]]:
        """(prune, merge) kept counts per block, class token included; block 0 keeps everything."""
        stages = self.hard_stage_patches()
        full = self.num_patches + 1
        prune = [full] + [c + 1 for c in stages[0::2]]
        merge = [full] + [c + 1 for c in stages[1::2]]
        return prune, merge
