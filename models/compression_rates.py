"""Learnable kept-token counts (DiffRate-style differentiable compression rates).

Every block but the first owns two distributions over candidate numbers of kept patch tokens,
one for pruning and one for merging. The kept count is the expectation under the distribution,
ceiled with a straight-through estimator, and never increases with depth.
"""
import math
from typing import List, Optional, Tuple

import torch
from torch import nn

from .schedule import Schedule


def ste_ceil(x: torch.Tensor) -> torch.Tensor:
    """ceil(x) in the forward pass, identity gradient in the backward pass."""
    return x + (torch.ceil(x) - x).detach()


SEARCH_STARTS = ('uniform', 'dense', 'geometric')


class CompressionRates(nn.Module):
    """Prune and merge kept counts of blocks 1..depth-1, as learnable distributions.

    Rows of `logits` interleave the stages in execution order: prune(1), merge(1), prune(2), ...
    Counts are numbers of *patch* tokens inside the module; `Schedule` converts to the public
    layout. A schedule fixed with `fix` overrides the distributions; it is not part of the
    state_dict (the weights), checkpoints store it on its own.
    """

    def __init__(self, depth: int, num_patches: int, granularity: int = 4, prefix: int = 1) -> None:
        super().__init__()
        if granularity < 1:
            raise ValueError(f'granularity must be >= 1, got {granularity}')
        self.depth = depth
        self.num_patches, self.prefix = num_patches, prefix
        self.num_stages = 2 * (depth - 1)
        candidates = torch.arange(num_patches, 0, -granularity, dtype=torch.float32)  # [K]: N, N-g, ...
        self.register_buffer('candidates', candidates, persistent=False)
        # keeps_position[j, k] = 1 if sorted position j survives with candidate k. Positions count
        # the patch tokens from 1: the `prefix` tokens in front sit at 1 - prefix, ..., 0.
        positions = torch.arange(num_patches + prefix, dtype=torch.float32) - (prefix - 1)
        self.register_buffer('keeps_position', (positions[:, None] <= candidates[None]).float(), persistent=False)
        self.register_buffer('positions', positions, persistent=False)
        # NOTE zeros = uniform distribution, as DiffRate starts its search.
        self.logits = nn.Parameter(torch.zeros(self.num_stages, len(candidates)))
        # Kept patch count of every stage fixed by `fix` (-1: learned).
        self.register_buffer('fixed', torch.full((self.num_stages,), -1, dtype=torch.long), persistent=False)
        # NOTE the same counts on the host: a fixed schedule is read without touching a tensor, so
        # evaluation costs no host sync and torch.export / ONNX tracing see constants.
        self._fixed_host: Optional[List[int]] = None
        self._cache: Optional[Tuple[tuple, torch.Tensor, List[int]]] = None  # key, counts on device, on host

    @property
    def is_fixed(self) -> bool:
        return self._fixed_host is not None

    def reset(self, start: str = 'uniform') -> None:
        """Restart the distributions: 'uniform' (DiffRate's start: every candidate equally likely,
        about half the tokens kept) or 'dense' (95% of the mass on keeping every token). A start
        at a given schedule is `start_at`."""
        if start not in ('uniform', 'dense'):
            raise ValueError(f'search start must be uniform or dense, got {start!r}')
        with torch.no_grad():
            self.logits.zero_()
            if start == 'dense':
                # NOTE log(K) + 3 puts 95% of the mass on full keep (the expectation keeps about 97%
                # of the tokens): nearer to 100% the softmax saturates, and the search would need
                # hundreds of steps before its counts move at all.
                self.logits[:, 0] = math.log(self.logits.shape[1]) + 3.0

    def start_at(self, schedule: Schedule) -> None:
        """Restart the distributions peaked at `schedule`'s counts, every stage at its own count
        (DiffRate's uniform start puts them all at one). Each stage's logits are
        -2 |candidate - centre| / g: neighbouring candidates keep e^-2 of the mass per step of g,
        so the search can still move them; the centre is found by bisection so that the
        expectation is the count - 0.5, which the straight-through ceil reads as the count.
        Raises ValueError if the schedule does not fit."""
        schedule.check(self.depth, self.num_patches, self.prefix)
        wanted = torch.tensor(schedule.stages(self.prefix), dtype=torch.float64) - 0.5  # [S]
        candidates = self.candidates.double()
        step = float(candidates[0] - candidates[1]) if len(candidates) > 1 else 1.0

        def logits(centre: torch.Tensor) -> torch.Tensor:  # [S] -> [S, K]
            return -2.0 * (candidates[None] - centre[:, None]).abs() / step

        low, high = wanted - 2 * self.num_patches, wanted + 2 * self.num_patches
        for _ in range(60):  # the expectation grows with the centre
            middle = (low + high) / 2
            above = logits(middle).softmax(-1) @ candidates > wanted
            low, high = torch.where(above, low, middle), torch.where(above, middle, high)
        with torch.no_grad():
            self.logits.copy_(logits((low + high) / 2).to(self.logits))

    def stage_patches(self) -> torch.Tensor:
        """Kept patch count of every stage, [2 * (depth - 1)], integer-valued, differentiable.

        Forward values are ceil(E[count]) chained by a running minimum. Gradients reach every
        stage's own logits through its expectation, also where an earlier stage's smaller count
        is the one that holds (DiffRate's straight-through min): routing them to the earlier
        stage instead would leave a clamped stage with no budget signal at all.
        """
        expected = self.logits.softmax(dim=-1) @ self.candidates  # [S]
        counts = ste_ceil(expected)
        counts = torch.where(self.fixed >= 0, self.fixed.to(counts.dtype), counts)
        running = torch.cummin(counts.detach(), dim=0).values
        return counts + (running - counts).detach()

    def _hard_counts(self) -> Tuple[torch.Tensor, List[int]]:
        """stage_patches() without gradient, [S] on the device and as a host list (one host sync;
        cached while the parameters and the fixed schedule are unchanged)."""
        key = (self.logits._version, self.fixed._version, self.logits.data_ptr(), self.fixed.data_ptr())
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                counts = self.stage_patches()
            host = counts.float().tolist()
            if not all(math.isfinite(c) for c in host):
                raise FloatingPointError('the compression-rate parameters are not finite (NaN or inf)')
            self._cache = (key, counts, [int(round(c)) for c in host])
        return self._cache[1], self._cache[2]

    def hard_stage_patches(self) -> List[int]:
        """Integer kept patch counts of every stage."""
        if self._fixed_host is not None:
            return list(self._fixed_host)
        return list(self._hard_counts()[1])

    def token_masks(self) -> torch.Tensor:
        """Straight-through keep masks over sorted positions, [S, N + prefix] (prefix tokens first).

        Forward: a stage zeroes the positions it removes itself, (its count, the count before it],
        and leaves 1 everywhere else; the block multiplies its stages' masks into the running mask.
        Backward: gradient of P(position kept) = sum of probabilities of candidates >= position,
        only for a stage that removes tokens (its count below the tokens still alive). As in
        DiffRate (deit.py: `if prune_kept_num < last_token_number`), a stage held by an earlier,
        smaller count has a constant mask of ones: it feels the budget, not the task loss.
        NOTE positions removed by another stage must read 1 here, not 0: in the product
        mask = previous * prune * merge, d mask / d prune at a pruned position is merge's value
        there, so a merge mask of 0 beyond the prune count would hide from the prune distribution
        every token it prunes, and the search would see pruning as free.
        The counts are hard_stage_patches' own device tensor: copying the host's list over would
        synchronise the GPU in every training step.
        """
        counts = self._hard_counts()[0]  # [S], integer-valued, a running minimum
        before = torch.cat([counts.new_full((1,), self.num_patches), counts[:-1]])  # [S]
        positions = self.positions[None]  # [1, N + prefix]
        removed = (positions > counts[:, None]) & (positions <= before[:, None])  # [S, N + prefix]
        hard = (~removed).to(self.logits.dtype)
        soft = self.logits.softmax(dim=-1) @ self.keeps_position.T.to(self.logits.dtype)  # [S, N + prefix]
        constant = (self.fixed >= 0) | (counts >= before)  # [S]: fixed, or removes nothing
        soft = torch.where(constant[:, None], hard, soft)
        return hard + soft - soft.detach()

    def fix(self, schedule: Schedule) -> None:
        """Fix the schedule (evaluation, fine-tuning); raises ValueError if it does not fit."""
        schedule.check(self.depth, self.num_patches, self.prefix)
        self._fixed_host = list(schedule.stages(self.prefix))
        self.fixed.copy_(torch.tensor(self._fixed_host, dtype=torch.long))

    def release(self) -> None:
        """Return to the learned schedule (undo fix)."""
        self._fixed_host = None
        self.fixed.fill_(-1)

    def schedule(self) -> Schedule:
        """The schedule in force: the fixed one, or the learned one's hard counts."""
        return Schedule.from_stages(self.hard_stage_patches(), self.num_patches, self.prefix)
