"""Token sorting, pruning and merging as pure tensor functions (the DTC core).

Two execution modes share every function:
* evaluation: compressed tokens are removed, tensors shrink;
* training: tokens stay in place, sorted so that alive tokens come first, and a straight-through
  keep mask hides the others from attention and pooling (gradients reach the rate parameters).
Because kept counts are shared by the batch, alive tokens sit at identical positions in both
modes, which is what makes the two forwards agree.
"""
import math
from dataclasses import dataclass, field, replace
from typing import Any, Dict, Hashable, Optional, Tuple

import torch
import torch.nn.functional as F

from .tracing import exporting, tracing


@dataclass
class TokenState:
    """What travels with the tokens through the blocks (B batch, N tokens, P patches).

    alive: number of leading tokens still alive (prefix tokens included); equals N in evaluation.
    prefix: the tokens in front of the patches (class token first, then distillation or register
           tokens), never pruned or merged.
    size:  [B, N, 1] number of patches each token stands for; None while all are 1.
    mask:  [B, N] straight-through keep mask (training only); None when every token is alive.
    owner: [B, P] index of the token each patch belongs to, N meaning "pruned"; None while the
           identity (patch p -> token p + prefix). Only tracked when `track_owner`.
    derived: what blocks derive from the owners (the EAB's shift lists), kept for the blocks that
           follow until the next compression, which starts an empty one.
    """
    alive: int
    grid_size: Tuple[int, int]
    prefix: int = 1
    size: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None
    owner: Optional[torch.Tensor] = None
    track_owner: bool = False
    derived: Dict[Hashable, Any] = field(default_factory=dict, repr=False, compare=False)

    def sizes(self, x: torch.Tensor) -> torch.Tensor:
        """size as a tensor, [B, N, 1]."""
        return self.size if self.size is not None else x.new_ones(x.shape[0], x.shape[1], 1)

    def owners(self, batch: int, device: torch.device) -> torch.Tensor:
        """owner as a tensor, [B, P]."""
        if self.owner is not None:
            return self.owner
        num_patches = self.grid_size[0] * self.grid_size[1]
        return torch.arange(self.prefix, num_patches + self.prefix, device=device).expand(batch, -1)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows index[b] of image b: x [B, N, ...], index [B, K] -> [B, K, ...].

    NOTE one index_select over the flattened batch: it copies whole rows, where `gather` with an
    index expanded over the channels looks up every element (2.5-4x slower, docs/benchmark.md).
    """
    B, N = x.shape[:2]
    return x.flatten(0, 1).index_select(0, _batch_rows(index, N)).view(B, index.shape[1], *x.shape[2:])


def add_rows(x: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x with rows[b, m] added to its row index[b, m]: x [B, K, C], index [B, M], rows [B, M, C]."""
    return x.flatten(0, 1).index_add(0, _batch_rows(index, x.shape[1]), rows.flatten(0, 1)).view_as(x)


def _batch_rows(index: torch.Tensor, rows_per_image: int) -> torch.Tensor:
    """Row indices [B, K] within each image -> [B * K] rows of the flattened batch."""
    offsets = torch.arange(0, index.shape[0] * rows_per_image, rows_per_image, device=index.device)
    return (index + offsets[:, None]).flatten()


def sort_by_importance(importance: torch.Tensor, alive: int, prefix: int = 1) -> torch.Tensor:
    """Order of tokens: the prefix tokens, alive patch tokens by importance (descending), the rest.

    importance: [B, N - prefix] class-token attention on patch tokens (in [0, 1]).
    Returns order: [B, N], order[b, t] = old index of the token moved to position t.
    """
    n_tokens = importance.shape[1] + prefix
    # prefix tokens score +inf, tokens that are no longer alive -inf: a stable sort keeps both in
    # place. NOTE a NaN score would sort before the prefix (weights gone non-finite): it scores
    # -inf, so the order stays a valid layout and the NaN reaches the loss, where training stops.
    scores = F.pad(torch.nan_to_num(importance[:, :alive - prefix], nan=-math.inf), (prefix, 0), value=math.inf)
    if alive < n_tokens:
        scores = F.pad(scores, (0, n_tokens - alive), value=-math.inf)
    if tracing():
        # NOTE ONNX has no sort; its TopK breaks ties by the lower index, as the stable sort does.
        return torch.topk(scores, n_tokens, dim=1).indices
    return torch.sort(scores, dim=1, descending=True, stable=True).indices


MERGE_RULES = ('size-weighted', 'diffrate')


def match_merge_targets(x: torch.Tensor, kept: int, end: int, prefix: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """For tokens kept..end-1, the most similar (cosine) token among prefix..kept-1.

    x: [B, N, C] sorted tokens. Returns dst: [B, end - kept] indices in [prefix, kept), and the
    cosine similarity to it, [B, end - kept]. A prefix token is never a destination.
    """
    with torch.no_grad():
        metric = F.normalize(x[:, prefix:end].float(), dim=-1)
        similarity = metric[:, kept - prefix:] @ metric[:, :kept - prefix].transpose(1, 2)  # [B, end-kept, kept-prefix]
        best, index = similarity.max(dim=-1)
        return index + prefix, best


def merge_into(x: torch.Tensor, size: torch.Tensor, dst: torch.Tensor, kept: int, end: int,
               rule: str = 'size-weighted', similarity: Optional[torch.Tensor] = None,
               training: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fold tokens kept..end-1 into their destinations.

    x: [B, N, C], size: [B, N, 1], dst and similarity: [B, end - kept]. Returns the new first
    `kept` tokens and their sizes, [B, kept, C] and [B, kept, 1], and the sizes the merged-away
    tokens carry on in training (masked), [B, end - kept, 1].
    rule 'size-weighted': the size-weighted mean of the tokens, sizes add up (ToMe).
    rule 'diffrate': DiffRate's merge (deit.py): the plain mean of the tokens, and each source's
    size scaled by its similarity to the destination before the sizes add up; in training every
    size is clamped to at least 1 first (the masked sources keep their scaled sizes, which their
    mask gradients see through the proportional attention), in evaluation not. NOTE evaluation
    then clamps the sums to a positive minimum, where DiffRate would take log(size <= 0) = NaN for
    a destination whose sources point away from it.
    """
    src, src_size = x[:, kept:end], size[:, kept:end]
    if rule == 'size-weighted':
        weighted = add_rows(x[:, :kept] * size[:, :kept], dst, src * src_size)
        merged_size = size[:, :kept].scatter_add(1, dst[..., None], src_size)
        return weighted / merged_size, merged_size, src_size
    if rule != 'diffrate':
        raise ValueError(f'merge rule must be one of {MERGE_RULES}, got {rule!r}')
    ones = size.new_ones(*dst.shape, 1)  # [B, end - kept, 1]
    members = size.new_ones(size.shape[0], kept, 1).scatter_add(1, dst[..., None], ones)  # tokens per destination
    merged = add_rows(x[:, :kept], dst, src) / members.to(x.dtype)  # [B, kept, C]
    dst_size, src_size = size[:, :kept], src_size * similarity[..., None].to(size.dtype)
    if training:
        dst_size, src_size = dst_size.clamp(min=1), src_size.clamp(min=1)
    merged_size = dst_size.scatter_add(1, dst[..., None], src_size)
    if not training:
        merged_size = merged_size.clamp(min=torch.finfo(merged_size.dtype).tiny)
    return merged, merged_size, src_size


def compress(x: torch.Tensor, state: TokenState, importance: torch.Tensor,
             prune_kept: int, merge_kept: int,
             keep_masks: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
             merge_rule: str = 'size-weighted') -> Tuple[torch.Tensor, TokenState]:
    """Sort by importance, prune to `prune_kept` tokens, then merge down to `merge_kept`.

    x: [B, N, C]; importance: [B, N - prefix]; kept counts include the prefix tokens.
    keep_masks: training only, the (prune, merge) straight-through masks over positions, [N]
    each (prefix tokens first); without it tokens are removed.
    merge_rule: see `merge_into`.
    """
    B, N = x.shape[:2]
    training = keep_masks is not None
    prune_kept = min(prune_kept, state.alive)
    merge_kept = min(merge_kept, prune_kept)
    if not training and merge_rule == 'size-weighted' and exporting():
        return compress_for_export(x, state, importance, prune_kept, merge_kept)
    order = sort_by_importance(importance, state.alive, state.prefix)  # [B, N]
    kept_order = order if training else order[:, :prune_kept]  # evaluation drops the pruned ones here
    x = gather_rows(x, kept_order)
    size = gather_rows(state.size, kept_order) if state.size is not None else x.new_ones(B, x.shape[1], 1)

    dst = None
    if merge_kept < prune_kept:
        dst, similarity = match_merge_targets(x, merge_kept, prune_kept, state.prefix)
        merged, merged_size, source_size = merge_into(x, size, dst, merge_kept, prune_kept, merge_rule, similarity,
                                                      training)
        if training:  # merged-away and pruned tokens stay in place, masked
            x = torch.cat([merged, x[:, merge_kept:]], dim=1)
            size = torch.cat([merged_size, source_size, size[:, prune_kept:]], dim=1)
        else:
            x, size = merged, merged_size

    mask = None
    if training:
        prune_mask, merge_mask = keep_masks
        previous = state.mask.gather(1, order) if state.mask is not None else x.new_ones(B, N)
        mask = previous * prune_mask[:N] * merge_mask[:N]  # [B, N]

    owner = None
    if state.track_owner:
        owner = _follow_owners(state.owners(B, x.device), order[:, :prune_kept], N, dst, merge_kept,
                               sentinel=x.shape[1])
    return x, replace(state, alive=merge_kept, size=size, mask=mask, owner=owner, derived={})


def compress_for_export(x: torch.Tensor, state: TokenState, importance: torch.Tensor,
                        prune_kept: int, merge_kept: int) -> Tuple[torch.Tensor, TokenState]:
    """`compress` in evaluation with the size-weighted rule, written for an exported graph: the
    same tokens, sizes and owners from a third fewer graph nodes, which onnxruntime pays for one by
    one whatever the batch (docs/benchmark.md, "Fewer nodes per compression").

    x: [B, N, C] (every token alive); importance: [B, N - prefix]; kept counts include the prefix.
    Differences from the general path, none of which changes the result for finite inputs: while
    tracing only the kept patches are ranked (TopK of prune_kept - 1, ties to the lower index as
    the stable sort, without the NaN guard of training); tokens picked by indexing (GatherND) instead
    of rows of the flattened batch (no offsets to build); the sources' similarity is ranked against
    normalised destinations only (a positive factor per source does not change its argmax);
    merging is a product with the [B, M, S] one-hot assignment instead of two scatters.
    """
    B, N, C = x.shape
    prefix = state.prefix
    if tracing():  # [B, prune_kept] old token indices, prefix tokens first
        kept_patches = importance.topk(prune_kept - prefix, dim=1).indices + prefix
        order = torch.cat([torch.arange(prefix, device=x.device).expand(B, -1), kept_patches], dim=1)
    else:  # eager export_numerics(): eager topk does not promise the lower index on ties
        order = sort_by_importance(importance, N, prefix)[:, :prune_kept]
    # NOTE indexing exports as GatherND of whole rows; gather(1, order.expand(..., C)) would write
    # and read an index as large as x (3x slower in onnxruntime at DeiT-S's width)
    images = torch.arange(B, device=x.device)[:, None]  # [B, 1]
    x = x[images, order]  # [B, prune_kept, C]
    size = state.size[images, order] if state.size is not None else state.sizes(x)  # [B, prune_kept, 1]
    dst = None
    if merge_kept < prune_kept:
        with torch.no_grad():
            destinations = x[:, prefix:merge_kept].float()
            destinations = destinations / destinations.norm(dim=-1, keepdim=True).clamp(min=1e-12)  # [B, M - prefix, C]
            similarity = x[:, merge_kept:].float() @ destinations.transpose(1, 2)  # [B, S, M - prefix]
            dst = similarity.argmax(dim=-1) + prefix  # [B, S], position among the kept tokens (never a prefix)
            # assign[b, m, s] = 1 where source s merges into kept token m, [B, M, S]
            assign = (torch.arange(merge_kept, device=x.device)[:, None] == dst[:, None, :]).to(x.dtype)
        kept_size, source_size = size[:, :merge_kept], size[:, merge_kept:]
        size = kept_size + assign @ source_size  # [B, M, 1]
        x = (x[:, :merge_kept] * kept_size + assign @ (x[:, merge_kept:] * source_size)) / size
    owner = None
    if state.track_owner:
        owner = _follow_owners(state.owners(B, x.device), order, N, dst, merge_kept, sentinel=merge_kept)
    return x, replace(state, alive=merge_kept, size=size, mask=None, owner=owner, derived={})


def _follow_owners(owner: torch.Tensor, kept_order: torch.Tensor, tokens: int, dst: Optional[torch.Tensor],
                   merge_kept: int, sentinel: int) -> torch.Tensor:
    """New owner of every patch after sort, prune and merge; pruned patches point to `sentinel`.

    owner: [B, P] old token indices (`tokens` = pruned); kept_order: [B, prune_kept] old indices of
    the kept tokens in their new order; dst: [B, prune_kept - merge_kept] or None.
    """
    B = kept_order.shape[0]
    new_of_sorted = torch.arange(merge_kept, device=kept_order.device).expand(B, -1)  # [B, prune_kept] with dst
    if dst is not None:
        new_of_sorted = torch.cat([new_of_sorted, dst], dim=1)
    # old token -> new token, [B, tokens + 1]: pruned tokens and the old sentinel -> sentinel
    new_of_old = owner.new_full((B, tokens + 1), sentinel).scatter_(1, kept_order, new_of_sorted)
    return new_of_old.gather(1, owner)
