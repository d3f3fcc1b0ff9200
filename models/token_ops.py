"""Token sorting, pruning and merging as pure tensor functions (the DTC core).

Two execution modes share every function:
* evaluation: compressed tokens are removed, tensors shrink;
* training: tokens stay in place, sorted so that alive tokens come first, and a straight-through
  keep mask hides the others from attention and pooling (gradients reach the rate parameters).
Because kept counts are shared by the batch, alive tokens sit at identical positions in both
modes, which is what makes the two forwards agree.
"""
from dataclasses import dataclass, replace
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .tracing import tracing


@dataclass
class TokenState:
    """What travels with the tokens through the blocks (B batch, N tokens, P patches).

    alive: number of leading tokens still alive (class token included); equals N in evaluation.
    size:  [B, N, 1] number of patches each token stands for; None while all are 1.
    mask:  [B, N] straight-through keep mask (training only); None when every token is alive.
    owner: [B, P] index of the token each patch belongs to, N meaning "pruned"; None while the
           identity (patch p -> token p + 1). Only tracked when `track_owner`.
    """
    alive: int
    grid_size: Tuple[int, int]
    size: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None
    owner: Optional[torch.Tensor] = None
    track_owner: bool = False

    def sizes(self, x: torch.Tensor) -> torch.Tensor:
        """size as a tensor, [B, N, 1]."""
        return self.size if self.size is not None else x.new_ones(x.shape[0], x.shape[1], 1)

    def owners(self, batch: int, device: torch.device) -> torch.Tensor:
        """owner as a tensor, [B, P]."""
        if self.owner is not None:
            return self.owner
        num_patches = self.grid_size[0] * self.grid_size[1]
        return torch.arange(1, num_patches + 1, device=device).expand(batch, -1)


def sort_by_importance(importance: torch.Tensor, alive: int) -> torch.Tensor:
    """Order of tokens: class token, alive patch tokens by importance (descending), the rest.

    importance: [B, N - 1] class-token attention on patch tokens.
    Returns order: [B, N], order[b, t] = old index of the token moved to position t.
    """
    B, n_patches = importance.shape
    scores = importance[:, :alive - 1]
    if tracing():
        # NOTE ONNX has no sort; its TopK breaks ties by the lower index, as the stable sort does.
        ranked = torch.topk(scores, scores.shape[1], dim=1).indices + 1
    else:
        ranked = torch.sort(scores, dim=1, descending=True, stable=True).indices + 1
    head = torch.zeros(B, 1, dtype=ranked.dtype, device=ranked.device)
    tail = torch.arange(alive, n_patches + 1, device=ranked.device).expand(B, -1)
    return torch.cat([head, ranked, tail], dim=1)


def match_merge_targets(x: torch.Tensor, kept: int, end: int) -> torch.Tensor:
    """For tokens kept..end-1, the most similar (cosine) token among 1..kept-1.

    x: [B, N, C] sorted tokens. Returns dst: [B, end - kept] indices in [1, kept).
    The class token is never a destination.
    """
    with torch.no_grad():
        metric = F.normalize(x[:, :end].float(), dim=-1)
        similarity = metric[:, kept:end] @ metric[:, :kept].transpose(1, 2)  # [B, end-kept, kept]
        similarity[..., 0] = -torch.inf
        return similarity.argmax(dim=-1)


def merge_into(x: torch.Tensor, size: torch.Tensor, dst: torch.Tensor, kept: int, end: int):
    """Fold tokens kept..end-1 into their destinations: size-weighted mean, sizes add up.

    x: [B, N, C], size: [B, N, 1], dst: [B, end - kept]. Returns the new first `kept` tokens
    and their sizes: [B, kept, C], [B, kept, 1].
    """
    C = x.shape[-1]
    weighted = (x[:, :kept] * size[:, :kept]).scatter_add(
        1, dst[..., None].expand(-1, -1, C), x[:, kept:end] * size[:, kept:end])
    merged_size = size[:, :kept].scatter_add(1, dst[..., None], size[:, kept:end])
    return weighted / merged_size, merged_size


def compress(x: torch.Tensor, state: TokenState, importance: torch.Tensor,
             prune_kept: int, merge_kept: int,
             keep_masks: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
             ) -> Tuple[torch.Tensor, TokenState]:
    """Sort by importance, prune to `prune_kept` tokens, then merge down to `merge_kept`.

    x: [B, N, C]; importance: [B, N - 1]; kept counts include the class token.
    keep_masks: training only, the (prune, merge) straight-through masks over positions, [N + 1]
    each (position 0 = class token); without it tokens are removed.
    """
    B, N, C = x.shape
    training = keep_masks is not None
    prune_kept = min(prune_kept, state.alive)
    merge_kept = min(merge_kept, prune_kept)
    order = sort_by_importance(importance, state.alive)  # [B, N]
    size = state.sizes(x).gather(1, order[..., None])
    x = x.gather(1, order[..., None].expand(-1, -1, C))

    dst = None
    if merge_kept < prune_kept:
        dst = match_merge_targets(x, merge_kept, prune_kept)
        merged, merged_size = merge_into(x, size, dst, merge_kept, prune_kept)
        if training:  # merged-away and pruned tokens stay in place, masked
            x = torch.cat([merged, x[:, merge_kept:]], dim=1)
            size = torch.cat([merged_size, size[:, merge_kept:]], dim=1)
        else:
            x, size = merged, merged_size
    elif not training:
        x, size = x[:, :merge_kept], size[:, :merge_kept]

    mask = None
    if training:
        prune_mask, merge_mask = keep_masks
        previous = state.mask.gather(1, order) if state.mask is not None else x.new_ones(B, N)
        mask = previous * prune_mask[:N] * merge_mask[:N]  # [B, N]

    owner = None
    if state.track_owner:
        owner = _follow_owners(state.owners(B, x.device), order, dst, prune_kept, merge_kept,
                               sentinel=x.shape[1])
    return x, replace(state, alive=merge_kept, size=size, mask=mask, owner=owner)


def _follow_owners(owner: torch.Tensor, order: torch.Tensor, dst: Optional[torch.Tensor],
                   prune_kept: int, merge_kept: int, sentinel: int) -> torch.Tensor:
    """New owner of every patch after sort, prune and merge; pruned patches point to `sentinel`.

    owner: [B, P] old token indices (old N = pruned); order: [B, N]; dst: [B, prune_kept - merge_kept].
    """
    B, N = order.shape
    new_of_sorted = torch.arange(N, device=order.device).expand(B, -1).clone()  # [B, N]
    if dst is not None:
        new_of_sorted[:, merge_kept:prune_kept] = dst
    new_of_sorted[:, prune_kept:] = sentinel
    new_of_old = torch.empty_like(new_of_sorted).scatter_(1, order, new_of_sorted)
    new_of_old = torch.cat([new_of_old, new_of_old.new_full((B, 1), sentinel)], dim=1)  # old sentinel
    return new_of_old.gather(1, owner)
