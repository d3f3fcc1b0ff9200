"""The kept-token schedule: one immutable value, its validation and conversions, and the
hand-set schedules (dense, smallest, uniform) computed as pure functions of the model's shape.

Public layout (what users, compression_rate.json and checkpoints see): for every block, the
number of tokens kept after pruning and after merging, prefix tokens (class, distillation,
registers: `prefix` of them, never removed) included; block 0 keeps all.
Stage layout (what `CompressionRates` learns): patch counts of blocks 1..depth-1 interleaved in
execution order, prune(1), merge(1), prune(2), ... These two conversions live here only.
"""
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch

from .flops import ModelShape, analytic_flops


@dataclass(frozen=True)
class Schedule:
    """prune[i], merge[i]: tokens (prefix tokens included) kept by block i after pruning and after
    merging. Tokens pruned are dropped, tokens merged are folded into their most similar kept
    token, so merge[i] tokens leave block i."""
    prune: Tuple[int, ...]
    merge: Tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, 'prune', tuple(int(c) for c in self.prune))
        object.__setattr__(self, 'merge', tuple(int(c) for c in self.merge))

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def dense(cls, depth: int, num_patches: int, prefix: int = 1) -> 'Schedule':
        full = num_patches + prefix
        return cls((full,) * depth, (full,) * depth)

    @classmethod
    def from_stages(cls, stages: Sequence[int], num_patches: int, prefix: int = 1) -> 'Schedule':
        """From patch counts in the stage layout, [2 * (depth - 1)]."""
        full = num_patches + prefix
        return cls((full,) + tuple(int(c) + prefix for c in stages[0::2]),
                   (full,) + tuple(int(c) + prefix for c in stages[1::2]))

    # --- views ----------------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return len(self.prune)

    def stages(self, prefix: int = 1) -> List[int]:
        """Patch counts in the stage layout: prune(1), merge(1), prune(2), ..."""
        return [c - prefix for pair in zip(self.prune[1:], self.merge[1:]) for c in pair]

    def flops(self, shape: ModelShape) -> float:
        """FLOPs of one image of a model of `shape` under this schedule."""
        prune = torch.tensor(self.prune[1:], dtype=torch.float64)
        merge = torch.tensor(self.merge[1:], dtype=torch.float64)
        return float(analytic_flops(shape, prune, merge))

    def as_dict(self) -> Dict[str, List[int]]:
        return {'prune_kept_num': list(self.prune), 'merge_kept_num': list(self.merge)}

    def merged_tokens(self) -> List[int]:
        """Tokens merged away in every block."""
        return [p - m for p, m in zip(self.prune, self.merge)]

    def pruned_tokens(self) -> List[int]:
        """Tokens pruned in every block."""
        previous = (self.prune[0],) + self.merge[:-1]
        return [n - p for n, p in zip(previous, self.prune)]

    # --- variants at the same token counts ------------------------------------------------------
    def prune_only(self) -> 'Schedule':
        """The same tokens per block leave every block, all of them by pruning."""
        return Schedule(self.merge, self.merge)

    def merge_only(self) -> 'Schedule':
        """The same tokens per block leave every block, all of them by merging."""
        return Schedule((self.prune[0],) + self.merge[:-1], self.merge)

    def running_min(self) -> 'Schedule':
        """The schedule as DiffRate's runtime reads it: a block never keeps more tokens than
        the previous one passes on, nor merges to more than it kept after pruning."""
        prune, merge, current = [], [], self.prune[0]
        for p, m in zip(self.prune, self.merge):
            current = min(current, p)
            prune.append(current)
            current = min(current, m)
            merge.append(current)
        return Schedule(prune, merge)

    # --- validation -----------------------------------------------------------------------------
    def check(self, depth: int, num_patches: int, prefix: int = 1) -> None:
        """Raise ValueError naming the first problem: length, block 0 not dense, a count out of
        [prefix + 1, num_patches + prefix], counts that increase with depth, or merge above prune."""
        full = num_patches + prefix
        for name, counts in (('prune', self.prune), ('merge', self.merge)):
            if len(counts) != depth:
                raise ValueError(f'{name} schedule has {len(counts)} entries, the model has {depth} blocks')
            if counts[0] != full:
                raise ValueError(f'{name} schedule must keep all {full} tokens in block 0, got {counts[0]}')
            bad = [c for c in counts if not prefix + 1 <= c <= full]
            if bad:
                raise ValueError(f'{name} kept counts must lie in [{prefix + 1}, {full}], got {bad}')
        for block in range(depth):
            if self.merge[block] > self.prune[block]:
                raise ValueError(f'block {block} merges down to {self.merge[block]} tokens, more than the '
                                 f'{self.prune[block]} left after pruning')
            if block and self.prune[block] > self.merge[block - 1]:
                raise ValueError(f'block {block} keeps {self.prune[block]} tokens, more than the '
                                 f'{self.merge[block - 1]} that block {block - 1} passes on')


def smallest_kept_patches(num_patches: int, granularity: int) -> int:
    """The smallest candidate kept patch count: num_patches - k * granularity, at least 1."""
    return (num_patches - 1) % granularity + 1


def smallest_schedule(shape: ModelShape, granularity: int) -> Schedule:
    """Every block after the first keeps the smallest candidate count."""
    kept = smallest_kept_patches(shape.num_patches, granularity) + shape.num_prefix
    full = shape.num_patches + shape.num_prefix
    counts = (full,) + (kept,) * (shape.depth - 1)
    return Schedule(counts, counts)


def flops_range(shape: ModelShape, granularity: int) -> Tuple[float, float]:
    """(smallest reachable, dense) GFLOPs of a model of `shape`."""
    dense = Schedule.dense(shape.depth, shape.num_patches, shape.num_prefix).flops(shape)
    return smallest_schedule(shape, granularity).flops(shape) / 1e9, dense / 1e9


def uniform_schedule(shape: ModelShape, target_flops: float, mode: str = 'merge', spacing: str = 'count',
                     dense_blocks: int = 0) -> Schedule:
    """A hand-set schedule at the FLOPs closest to `target_flops` that removes tokens evenly over
    the blocks after the first, by merging (mode 'merge') or by pruning the least attended
    ('prune'). spacing 'count': the same number r of tokens in every block (ToMe's schedule; it
    cannot go below about half the dense FLOPs, where r empties the last block); 'ratio': the
    same fraction of the patch tokens in every block (geometric, reaches every budget).
    dense_blocks: that many blocks after the first keep every token before the removals start
    (the back-loaded family: the shape the search learns on a pretrained backbone). The parameter
    is found by bisection and the counts rounded per block.
    """
    if mode not in ('merge', 'prune'):
        raise ValueError(f'mode must be merge or prune, got {mode!r}')
    if spacing not in ('count', 'ratio'):
        raise ValueError(f'spacing must be count or ratio, got {spacing!r}')
    full, depth, prefix = shape.num_patches + shape.num_prefix, shape.depth, shape.num_prefix
    if not 0 <= dense_blocks <= depth - 2:
        raise ValueError(f'dense_blocks must lie in [0, {depth - 2}] (blocks after the first that keep every token, '
                         f'one block left to compress), got {dense_blocks}')

    def schedule(r: float) -> Schedule:
        """r: tokens removed per block (count) or the fraction of patches removed per block (ratio)."""
        steps = [max(0, block - dense_blocks) for block in range(depth)]  # removal steps done by each block
        if spacing == 'count':
            after = [max(prefix + 1, round(full - r * step)) for step in steps]
        else:
            after = [max(prefix + 1, prefix + round(shape.num_patches * (1 - r) ** step)) for step in steps]
        before = after if mode == 'prune' else [full] + after[:-1]
        return Schedule(before, after)

    def gflops(r: float) -> float:
        return schedule(r).flops(shape) / 1e9

    low, high = 0.0, (full / (depth - 1 - dense_blocks) if spacing == 'count' else 1.0)
    if not gflops(high) <= target_flops <= gflops(low):
        kind = f'uniform {mode} schedule with the same {spacing} per block' + \
            (f' after {dense_blocks} dense blocks' if dense_blocks else '')
        raise ValueError(f'no {kind} reaches {target_flops} GFLOPs (range [{gflops(high):.3f}, {gflops(low):.3f}])')
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (middle, high) if gflops(middle) > target_flops else (low, middle)
    return schedule(min((low, high), key=lambda r: abs(gflops(r) - target_flops)))


BUDGET_TOLERANCE = 0.02  # a searched schedule lands at or below its budget and within 2% of it


def onto_budget(schedule: Schedule, shape: ModelShape, target_flops: float,
                tolerance: float = BUDGET_TOLERANCE) -> Schedule:
    """`schedule` brought onto `target_flops` GFLOPs keeping its shape: every count's fraction f of
    the patches raised to one power b (f ** b; blocks that keep every patch still do, the order of
    the removals and their relative steepness stay: log f scales by b), b found by bisection so
    that the FLOPs are at or below the target, then single tokens added block by block while the
    budget holds (blocks of equal fraction move together under a power). Returned
    unchanged when its FLOPs already lie in [(1 - tolerance) * target, target]. ValueError when no
    power reaches the target (the blocks that keep every patch cost more than it).
    """
    prefix, patches = shape.num_prefix, shape.num_patches
    schedule.check(shape.depth, patches, prefix)

    def powered(b: float) -> Schedule:
        def counts(kept):
            return [prefix + max(1, round(patches * ((c - prefix) / patches) ** b)) for c in kept]
        return Schedule(counts(schedule.prune), counts(schedule.merge)).running_min()

    def gflops(candidate: Schedule) -> float:
        return candidate.flops(shape) / 1e9

    if (1 - tolerance) * target_flops <= gflops(schedule) <= target_flops:
        return schedule
    low, high = -12.0, 12.0  # log2 of b: from nearly every patch kept to one patch where f < 1
    if gflops(powered(2 ** high)) > target_flops:
        raise ValueError(f'no power of its kept fractions brings it below {gflops(powered(2 ** high)):.4f} GFLOPs')
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if gflops(powered(2 ** middle)) > target_flops else (low, middle)
    fitted = powered(2 ** high)
    # whole tokens: a power moves blocks of equal fraction together; one more token in a block,
    # block by block, where the order allows and the budget still holds
    prune, merge = list(fitted.prune), list(fitted.merge)
    for block in range(1, fitted.depth):
        if prune[block] + 1 <= merge[block - 1] and gflops(fitted) < (1 - tolerance) * target_flops:
            candidate = Schedule(prune[:block] + [prune[block] + 1] + prune[block + 1:],
                                 merge[:block] + [merge[block] + 1] + merge[block + 1:])
            if gflops(candidate) <= target_flops:
                fitted, prune, merge = candidate, list(candidate.prune), list(candidate.merge)
    return fitted
