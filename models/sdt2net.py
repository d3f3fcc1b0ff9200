"""SDT2Net: a vision transformer with EAB, DTC and FTF, built on timm's VisionTransformer.

Any configuration of timm's VisionTransformer with timm's Block, Attention and Mlp works (DeiT,
DeiT III, AugReg, DINOv2 with registers, CLIP, MAE with average pooling, DeiT distilled, SigLIP
with its attention-pooling head, timm's `gap` ViTs): prefix tokens are never compressed; the class
token's attention ranks the patches, or without a class token the attention each patch receives;
average pooling weighs tokens by size, and an attention-pooling head gives a merged token log(size)
extra logit (ToMe's proportional attention).
Blocks are injected through `block_fn`; token state (sizes, masks, patch owners) is passed from
block to block explicitly. `eab`, `ftf` and the compression (a schedule at full keep) can each be
switched off for ablations. Building from a timm name or a built timm model: `from_timm.py`.
"""
from functools import partial
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import Attention, AttentionPoolLatent, Mlp, PatchEmbed
from timm.models import build_model_with_cfg, get_pretrained_cfg, register_model
from timm.models.vision_transformer import Block, VisionTransformer

from .checkpoint import adapt_state_dict
from .eab import EfficientAttentionShift
from .flops import ModelShape, analytic_flops
from .ftf import SecondOrderHead
from .compression_rates import CompressionRates
from .schedule import Schedule
from .token_ops import MERGE_RULES, TokenState, compress
from .tracing import exporting


# The layers SDT2Net subclasses or counts: a ViT built with others is refused.
_TIMM_LAYERS = {'block_fn': (Block,), 'attn_layer': (Attention, 'attention'), 'mlp_layer': (Mlp,),
                'embed_layer': (PatchEmbed,)}


def unsupported_vit(kwargs: Dict) -> str:
    """What in these VisionTransformer arguments SDT2Net cannot follow ('' if nothing)."""
    pool = kwargs.get('global_pool', 'token')
    class_token = kwargs.get('class_token', True)
    if pool not in SDT2Net.POOLS:
        return (f'global_pool={pool!r}: SDT2Net pools by the class token, a size-weighted average or an '
                f'attention-pooling head with proportional attention (token, avg, map)')
    if pool == 'token' and not class_token:
        return 'global_pool=token without a class token (class_token=False)'
    if kwargs.get('distilled') and (pool != 'token' or not class_token):
        return 'a distilled model pools by its class and distillation tokens (global_pool=token)'
    if kwargs.get('pool_include_prefix'):
        return 'pool_include_prefix=True: the average pools the patch tokens only'
    if kwargs.get('dynamic_img_size') or kwargs.get('dynamic_img_pad'):
        return 'dynamic_img_size / dynamic_img_pad: the token schedule is set for one patch grid'
    if kwargs.get('scale_attn_norm') or kwargs.get('scale_mlp_norm'):
        return 'scale_attn_norm / scale_mlp_norm (BEiT3\'s normed attention and MLP outputs, not in the FLOPs count)'
    if kwargs.get('patch_drop_rate'):
        return 'patch_drop_rate > 0: patch dropout removes patches that the token schedule counts'
    for name, allowed in _TIMM_LAYERS.items():
        if name in kwargs and kwargs[name] not in allowed:
            return f'{name}={getattr(kwargs[name], "__name__", kwargs[name])} (SDT2Net builds on timm\'s {allowed[0].__name__})'
    return ''


# How a block ranks the patch tokens before pruning (each [B, N - prefix], mean over heads):
# 'class': the attention the class token pays each patch (DiffRate, SDT2Net);
# 'received': the attention each patch receives, averaged over the alive queries (ViTs without a
# class token; docs/results.md measures it against the class token's and a random ranking).
IMPORTANCES = ('class', 'received')


class SDT2NetAttention(Attention):
    """timm attention plus EAB on q/k, proportional attention (log size) and keep masks.

    Evaluation uses fused attention; the class-token importance row is computed on its own, while
    ranking by received attention needs the map itself.
    Training computes the attention map explicitly so that the straight-through keep mask
    passes gradients to the rate parameters. Exported graphs compute the map explicitly too,
    from k^T as the EAB leaves it (the exporter's form of fused attention transposes k back and
    forth and computes its shapes in the graph).
    """

    def forward(self, x: torch.Tensor, state: TokenState, eab: Optional[EfficientAttentionShift] = None,
                importance: Optional[str] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """x: [B, N, C] -> (output [B, N, C], importance of the patches [B, N - prefix] or None);
        importance: None (not needed) or one of IMPORTANCES."""
        B, N, C = x.shape
        H, D = self.num_heads, self.head_dim
        if eab is not None and exporting():
            # The EAB runs channels first ([B, C, 2, N]): its shifts and 1x1 convs need no transposes
            # in between, and k leaves it in the layout of k^T. With the rows of q and k
            # interleaved in the qkv weight (q_0, k_0, q_1, k_1, ...; constants of the graph) one
            # plain transpose of the [B, N, 2C] output gets there.
            weight, bias = self.qkv.weight, self.qkv.bias
            order = torch.arange(2 * C, device=x.device).view(2, C).t().flatten()  # [2C]
            order = torch.cat([order, torch.arange(2 * C, 3 * C, device=x.device)])
            qkv = F.linear(x, weight[order], None if bias is None else bias[order])  # [B, N, 3C]
            qk = eab.forward_channels_first(qkv[..., :2 * C].transpose(1, 2).view(B, C, 2, N), state)
            q, k = (qk[:, :, i].reshape(B, H, D, N).transpose(-2, -1) for i in range(2))
            v = qkv[..., 2 * C:].reshape(B, N, H, D).transpose(1, 2)
        else:
            q, k, v = self.qkv(x).view(B, N, 3, C).unbind(2)  # [B, N, C] each
            if eab is not None:
                q, k = eab(q, k, state)
            q, k, v = (t.view(B, N, H, D).transpose(1, 2) for t in (q, k, v))
        q, k = self.q_norm(q), self.k_norm(k)  # [B, H, N, D]
        # Proportional attention (ToMe): a token standing for s patches gets log(s) extra logit.
        bias = state.size.log().to(q.dtype).view(B, 1, 1, N) if state.size is not None else None

        ranking = None
        if state.mask is not None:
            logits = (q * self.scale) @ k.transpose(-2, -1)  # [B, H, N, N]
            if bias is not None:
                logits = logits + bias
            # softmax restricted to alive keys (masked_softmax): m'_ij = m_j off the diagonal, 1 on it,
            # as DiffRate's softmax_with_policy: a token always sees itself, so a key's mask gradient
            # comes from the other queries only (alive tokens have m = 1 either way).
            eye = torch.eye(N, dtype=logits.dtype, device=logits.device)  # [N, N]
            keep = state.mask.to(logits.dtype)[:, None, :] * (1 - eye) + eye  # [B, N, N]
            attn = masked_softmax(logits, keep[:, None])
            if importance is not None:
                ranking = self._ranking(attn, state, importance)
            out = self.attn_drop(attn) @ v
        elif self.fused_attn and not exporting() and importance != 'received':
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, dropout_p=self.attn_drop.p if self.training else 0.)
        else:  # the map itself: exported graphs, and the attention the patches receive
            logits = (q * self.scale) @ k.transpose(-2, -1)
            if bias is not None:
                logits = logits + bias
            attn = logits.softmax(dim=-1)  # [B, H, N, N]
            if importance == 'received':
                ranking = self._ranking(attn, state, importance)
            out = self.attn_drop(attn) @ v
        if importance == 'class' and ranking is None:
            cls_logits = (q[:, :, :1] * self.scale) @ k.transpose(-2, -1)  # [B, H, 1, N]
            if bias is not None:
                cls_logits = cls_logits + bias
            ranking = cls_logits.softmax(dim=-1)[:, :, 0, state.prefix:].mean(dim=1)
        out = self.norm(out.transpose(1, 2).reshape(B, N, C))
        return self.proj_drop(self.proj(out)), ranking

    @staticmethod
    def _ranking(attn: torch.Tensor, state: TokenState, importance: str) -> torch.Tensor:
        """attn: [B, H, N, N] (rows: queries) -> importance of the patch tokens, [B, N - prefix]."""
        if importance == 'class':
            return attn[:, :, 0, state.prefix:].mean(dim=1)
        if state.mask is None:
            return attn.mean(dim=(1, 2))[:, state.prefix:]
        # masked queries attend to themselves alone: only the alive ones vote, [B, 1, N, 1]
        queries = state.mask.to(attn.dtype)[:, None, :, None]
        received = (attn * queries).sum(dim=2) / queries.sum(dim=2).clamp(min=1)  # [B, H, N]
        return received.mean(dim=1)[:, state.prefix:]


SOFTMAX_EPS = 1e-6  # DiffRate's softmax_with_policy: a floor under every masked softmax row


def masked_softmax(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Softmax of logits [..., N] over the keys that keep [..., N] (1 alive, 0 masked; broadcast)
    marks, as DiffRate's softmax_with_policy computes it so that the mask's gradient exists:
    e = exp(logits - row max) (its largest term is 1), attn = (e keep + eps / N) / (sum e keep + eps),
    in float32 or wider. The eps keeps a row and its gradient finite when every weight it keeps
    underflows (a row dominated by masked keys), where e keep / sum e keep is 0 / 0 (the clamped
    sum used before gave NaN gradients in fine-tuning); it also lends each masked key a weight of
    at most eps / N, so the masked forward equals the evaluation forward to about 1e-6."""
    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
    e = (wide - wide.amax(dim=-1, keepdim=True)).exp() * keep
    # NOTE the reciprocal of the [..., 1] sums times the map is cheaper than dividing the map
    return ((e + SOFTMAX_EPS / logits.shape[-1]) * (e.sum(dim=-1, keepdim=True) + SOFTMAX_EPS).reciprocal()).to(logits.dtype)


def attention_pool(pool: AttentionPoolLatent, x: torch.Tensor, size: Optional[torch.Tensor],
                   mask: Optional[torch.Tensor]) -> torch.Tensor:
    """timm's attention-pooling head (SigLIP's 'map') over compressed tokens: x [B, N, C] ->
    [B, C]. A token standing for s patches gets log(s) extra logit (ToMe's proportional
    attention), size [B, N, 1] or None (all 1); masked tokens (training, mask [B, N]) weigh 0,
    written as the blocks' masked softmax so that the mask's gradient exists. Without a mask it is
    timm's own forward with the log sizes as its additive attention mask."""
    B, N, C = x.shape
    bias = size.log().to(x.dtype).view(B, 1, 1, N) if size is not None else None  # [B, 1, 1, N]
    if mask is None:
        return pool(x, attn_mask=bias)
    H, D, L = pool.num_heads, pool.head_dim, pool.latent_len
    q = pool.q(pool.latent.expand(B, -1, -1)).reshape(B, L, H, D).transpose(1, 2)  # [B, H, L, D]
    k, v = pool.kv(x).reshape(B, N, 2, H, D).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, D] each
    q, k = pool.q_norm(q), pool.k_norm(k)
    logits = (q * pool.scale) @ k.transpose(-2, -1)  # [B, H, L, N]
    if bias is not None:
        logits = logits + bias
    attn = masked_softmax(logits, mask.to(logits.dtype)[:, None, None, :])
    out = pool.proj_drop(pool.proj((attn @ v).transpose(1, 2).reshape(B, L, C)))  # [B, L, C]
    if pool.mlp is not None:
        out = out + pool.mlp(pool.norm(out))
    return out[:, 0] if pool.pool == 'token' else out.mean(dim=1)


class SDT2NetBlock(Block):
    """Pre-norm transformer block: attention (with EAB), token compression, MLP."""

    def __init__(self, dim: int, num_heads: int, *, eab: bool = True, eab_ratio: float = 2.0, eab_groups: int = 1,
                 eab_shift: int = 2, eab_shared: bool = True, merge_rule: str = 'size-weighted', **kwargs) -> None:
        kwargs['attn_layer'] = SDT2NetAttention
        super().__init__(dim, num_heads, **kwargs)
        self.eab = EfficientAttentionShift(dim, eab_ratio, eab_groups, eab_shift, eab_shared) if eab else None
        self.merge_rule = merge_rule
        self.importance = 'class'  # how it ranks the patches: SDT2Net.rank_by sets every block's

    def forward(self, x: torch.Tensor, state: TokenState, kept: Optional[Tuple[int, int]] = None,
                keep_masks: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> Tuple[torch.Tensor, TokenState]:
        """x: [B, N, C]; kept: (prune, merge) kept counts with prefix tokens, None = no compression."""
        compresses = kept is not None and (keep_masks is not None or min(kept) < state.alive)
        attn_out, importance = self.attn(self.norm1(x), state, self.eab, self.importance if compresses else None)
        x = x + self.drop_path1(self.ls1(attn_out))
        if compresses:
            x, state = compress(x, state, importance, kept[0], kept[1], keep_masks, self.merge_rule)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, state


class SDT2Net(VisionTransformer):
    """VisionTransformer with learned token pruning/merging, EAB and a second-order head.

    Takes timm's VisionTransformer arguments (pooling 'token', 'avg' or 'map') and: eab (bool),
    eab_ratio (SCM expansion, official 2), eab_groups (1, or e.g. num_heads for the cheap grouped
    variant), eab_shift (patches the SCM shifts by, official 2, ELAN 1),
    eab_shared (one SCM for q and k, official; False: one each), ftf (bool), ftf_dim (48),
    granularity (candidate step), merge_rule ('size-weighted', or DiffRate's 'diffrate': see
    token_ops.merge_into), importance (how patches are ranked, IMPORTANCES; default 'class' with a
    class token, else 'received'), distilled (DeiT's distillation token and head: logits are the
    mean of the two heads, as timm's distilled DeiT in evaluation).
    """

    POOLS = ('token', 'avg', 'map')

    def __init__(self, *, eab: bool = True, eab_ratio: float = 2.0, eab_groups: int = 1, eab_shift: int = 2,
                 eab_shared: bool = True, ftf: bool = True, ftf_dim: int = 48, granularity: int = 4,
                 merge_rule: str = 'size-weighted', importance: Optional[str] = None, distilled: bool = False,
                 **kwargs) -> None:
        kwargs.setdefault('global_pool', 'token')
        problem = unsupported_vit(dict(kwargs, distilled=distilled))
        if problem:
            raise ValueError(f'SDT2Net cannot be built from this VisionTransformer: {problem}')
        if merge_rule not in MERGE_RULES:
            raise ValueError(f'merge_rule must be one of {MERGE_RULES}, got {merge_rule!r}')
        kwargs.pop('block_fn', None)  # timm's Block (checked above), which SDT2NetBlock extends
        block_fn = partial(SDT2NetBlock, eab=eab, eab_ratio=eab_ratio, eab_groups=eab_groups,
                           eab_shift=eab_shift, eab_shared=eab_shared, merge_rule=merge_rule)
        super().__init__(block_fn=block_fn, **kwargs)
        self.has_eab, self.eab_ratio = eab, eab_ratio
        self.eab_groups = eab_groups
        self.rank_by(importance or ('class' if self.has_class_token else 'received'))
        num_patches = self.patch_embed.num_patches
        self.dist_token = self.head_dist = None
        if distilled:  # class token, distillation token, patches (timm's VisionTransformerDistilled)
            self.num_prefix_tokens += 1
            self.dist_token = torch.nn.Parameter(torch.zeros(1, 1, self.embed_dim))
            torch.nn.init.trunc_normal_(self.dist_token, std=.02)
            embed_len = num_patches + (0 if self.no_embed_class else self.num_prefix_tokens)
            self.pos_embed = torch.nn.Parameter(torch.zeros(1, embed_len, self.embed_dim))
            torch.nn.init.trunc_normal_(self.pos_embed, std=.02)
            self.head_dist = torch.nn.Linear(self.embed_dim, self.num_classes) if self.num_classes else torch.nn.Identity()
        self.rates = CompressionRates(len(self.blocks), num_patches, granularity, prefix=self.num_prefix_tokens)
        self.ftf = SecondOrderHead(self.embed_dim, self.num_classes, ftf_dim) if ftf else None
        if self.ftf is not None:  # pre-logits: pooled features and second-order features side by side
            self.head_hidden_size = self.embed_dim + self.ftf.num_features
        # NOTE the token sizes and masks of the last forward_features, for forward_head: timm's
        # contract passes only the tokens between the two (forward itself passes the state).
        self._last_state: Optional[TokenState] = None

    # --- schedule -------------------------------------------------------------------------------
    def arch_parameters(self) -> List[torch.nn.Parameter]:
        """The compression-rate parameters."""
        return list(self.rates.parameters())

    def weight_parameters(self) -> List[torch.nn.Parameter]:
        """Every parameter that is not a compression-rate parameter."""
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def added_parameters(self) -> List[torch.nn.Parameter]:
        """The parameters SDT2Net adds to a ViT: every EAB and the FTF head. Their last layers start
        at zero, so a fine-tuned backbone starts without them (main.py's --added-lr-scale)."""
        added = [block.eab for block in self.blocks] + [self.ftf]
        return [p for module in added if module is not None for p in module.parameters()]

    def schedule(self) -> Schedule:
        """The schedule in force: the fixed one, or the learned one's current hard counts.

        A new model's rates are DiffRate's search start (uniform distributions, 101 of 197 kept
        from block 1 on); fix Schedule.dense(...) for the dense model.
        """
        return self.rates.schedule()

    def fix_schedule(self, schedule: Optional[Schedule]) -> None:
        """Fix a schedule (evaluation, fine-tuning), or with None return to the learned one.
        Raises ValueError when the schedule does not fit the model."""
        if schedule is None:
            self.rates.release()
        else:
            self.rates.fix(schedule)

    def rank_by(self, importance: str) -> None:
        """How every block ranks the patches before compressing (IMPORTANCES): a choice of
        evaluation as much as of training, so it can change on a trained model."""
        if importance not in IMPORTANCES:
            raise ValueError(f'importance must be one of {IMPORTANCES}, got {importance!r}')
        if importance == 'class' and not self.has_class_token:
            raise ValueError('importance=class needs a class token: rank by received attention')
        self.importance = importance
        for block in self.blocks:
            block.importance = importance

    @property
    def schedule_is_fixed(self) -> bool:
        return self.rates.is_fixed

    def get_kept_num(self) -> Tuple[List[int], List[int]]:
        """(prune, merge) kept counts per block, prefix tokens included (197 = all of DeiT at 224 px)."""
        schedule = self.schedule()
        return list(schedule.prune), list(schedule.merge)

    def set_kept_num(self, prune: List[int], merge: List[int]) -> None:
        """Fix the schedule from kept counts per block with DiffRate's API and semantics: the
        counts are read as a running minimum (see Schedule.running_min and fix_schedule)."""
        self.fix_schedule(Schedule(prune, merge).running_min())

    def shape(self) -> ModelShape:
        block = self.blocks[0]
        return ModelShape(
            embed_dim=self.embed_dim, depth=len(self.blocks), num_heads=block.attn.num_heads,
            mlp_hidden=block.mlp.fc1.out_features, num_patches=self.patch_embed.num_patches,
            patch_size=self.patch_embed.patch_size[0], in_chans=self.in_chans, num_classes=self.num_classes,
            eab=self.has_eab, eab_ratio=self.eab_ratio, eab_groups=self.eab_groups, ftf_dim=self.ftf.dim if self.ftf else 0,
            num_prefix=self.num_prefix_tokens, norm_pre=not isinstance(self.norm_pre, torch.nn.Identity),
            qk_norm=not isinstance(block.attn.q_norm, torch.nn.Identity),
            token_norm=not isinstance(self.norm, torch.nn.Identity),
            fc_norm=not isinstance(self.fc_norm, torch.nn.Identity), heads=2 if self.dist_token is not None else 1,
            rank_by_class=self.importance == 'class',
            pool_mlp_hidden=self.attn_pool.mlp.fc1.out_features if self.attn_pool is not None else 0)

    def flops(self) -> torch.Tensor:
        """FLOPs of one image under the current schedule (fvcore convention).

        In training mode the count is differentiable with respect to the rate parameters.
        """
        stages = self.rates.stage_patches() + self.num_prefix_tokens  # [2 * (depth - 1)], prefix included
        if not self.training:
            stages = stages.detach()
        return analytic_flops(self.shape(), stages[0::2], stages[1::2])

    # --- forward --------------------------------------------------------------------------------
    def forward_tokens(self, x: torch.Tensor, return_owners: bool = False) -> Tuple[torch.Tensor, TokenState, List[torch.Tensor]]:
        """Images [B, 3, H, W] -> (normed tokens [B, N, C], final state, per-block patch owners)."""
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        state = TokenState(alive=x.shape[1], grid_size=tuple(self.patch_embed.grid_size), prefix=self.num_prefix_tokens,
                           track_owner=return_owners or self.has_eab)
        stages = self.rates.hard_stage_patches()  # kept patch counts, one host sync at most
        masks = self.rates.token_masks() if self.training else None  # [S, N]
        owners = []
        for i, block in enumerate(self.blocks):
            kept = keep_masks = None
            if i > 0:
                kept = (stages[2 * i - 2] + state.prefix, stages[2 * i - 1] + state.prefix)
                if masks is not None:
                    keep_masks = (masks[2 * i - 2], masks[2 * i - 1])
            x, state = block(x, state, kept, keep_masks)
            if return_owners:
                owners.append(state.owners(x.shape[0], x.device))
        return self.norm(x), state, owners

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        tokens, self._last_state, _ = self.forward_tokens(x)
        return tokens

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embeddings [B, P, C] -> tokens [B, N, C]: timm's, or with a distillation token
        second (class, distillation, patches; as timm's VisionTransformerDistilled)."""
        if self.dist_token is None:
            return super()._pos_embed(x)
        prefix = torch.cat([self.cls_token, self.dist_token], dim=1).expand(x.shape[0], -1, -1)  # [B, 2, C]
        if self.no_embed_class:
            return self.pos_drop(torch.cat([prefix, x + self.pos_embed], dim=1))
        return self.pos_drop(torch.cat([prefix, x], dim=1) + self.pos_embed)

    def _pool(self, tokens: torch.Tensor, state: Optional[TokenState]) -> torch.Tensor:
        """tokens: [B, N, C] -> pooled features [B, C], before fc_norm: the class token, the
        attention-pooling head over the patch tokens, or the average of the patch tokens weighted
        by the patches each stands for (masked tokens weigh 0; at full keep timm's mean)."""
        if self.global_pool == 'token':
            return tokens[:, 0]
        weight, mask = self._patch_sizes(tokens, state)  # [B, N - prefix, 1], [B, N - prefix] or None
        if self.attn_pool is not None:
            return attention_pool(self.attn_pool, tokens[:, self.num_prefix_tokens:],
                                  weight if state is not None and state.size is not None else None, mask)
        if mask is not None:
            weight = weight * mask[..., None].to(weight.dtype)
        patches = tokens[:, self.num_prefix_tokens:]
        return (patches * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=torch.finfo(weight.dtype).tiny)

    def _patch_sizes(self, tokens: torch.Tensor, state: Optional[TokenState]):
        """(sizes [B, N - prefix, 1], mask [B, N - prefix] or None) of the patch tokens; without a
        state every token stands for one patch and none is masked."""
        prefix = self.num_prefix_tokens
        size = state.sizes(tokens) if state is not None else tokens.new_ones(*tokens.shape[:2], 1)
        mask = state.mask[:, prefix:] if state is not None and state.mask is not None else None
        return size[:, prefix:], mask

    def _head(self, tokens: torch.Tensor, state: Optional[TokenState], pre_logits: bool) -> torch.Tensor:
        """tokens: [B, N, C] -> logits [B, num_classes], or pre-logits [B, head_hidden_size]
        when asked for or when the model has no classifier (num_classes=0)."""
        features_only = pre_logits or self.num_classes == 0
        if self.dist_token is not None:  # as timm's distilled DeiT in evaluation: the mean of two heads
            pooled = (tokens[:, 0] + tokens[:, 1]) / 2  # [B, C]
            logits = None if features_only else (self.head(tokens[:, 0]) + self.head_dist(tokens[:, 1])) / 2
        else:
            pooled = self.head_drop(self.fc_norm(self._pool(tokens, state)))  # [B, C]
            logits = None if features_only else self.head(pooled)
        if self.ftf is None:
            return pooled if features_only else logits
        size, mask = self._patch_sizes(tokens, state)
        patches = tokens[:, self.num_prefix_tokens:]
        if features_only:
            return torch.cat([pooled, self.ftf.features(patches, size, mask).to(pooled.dtype)], dim=-1)
        return logits + self.ftf(patches, size, mask).to(pooled.dtype)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """x: forward_features' tokens [B, N, C]; their sizes and masks come from that call."""
        state = self._last_state
        if state is not None:
            carried = state.size if state.size is not None else state.mask
            if carried is not None and tuple(carried.shape[:2]) != tuple(x.shape[:2]):
                state = None  # not the tokens of the last forward_features
        return self._head(x, state, pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, state, _ = self.forward_tokens(x)
        return self._head(tokens, state, pre_logits=False)

    def forward_intermediates(self, *args, **kwargs):
        raise NotImplementedError(
            'SDT2Net removes and merges tokens block by block, so its intermediate token maps do not '
            'form a patch grid; use forward_tokens(x, return_owners=True) for the tokens and their patches')

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        # a distilled model pools by its two tokens; timm cannot add an attention-pooling head later
        allowed = ('token',) if self.dist_token is not None else tuple(
            pool for pool in self.POOLS
            if (pool != 'token' or self.has_class_token) and (pool != 'map' or self.attn_pool is not None))
        if global_pool is not None and global_pool not in allowed:
            raise ValueError(f'this SDT2Net can pool by {" or ".join(allowed)}, not {global_pool!r}')
        super().reset_classifier(num_classes, global_pool)
        if self.dist_token is not None:
            self.head_dist = torch.nn.Linear(self.embed_dim, num_classes) if num_classes else torch.nn.Identity()
        if self.ftf is not None:
            self.ftf.reset_classifier(num_classes)


# --- registration ------------------------------------------------------------------------------
_VARIANTS: Dict[str, Tuple[str, dict]] = {
    'tiny': ('deit_tiny_patch16_224.fb_in1k', dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)),
    'small': ('deit_small_patch16_224.fb_in1k', dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)),
    'base': ('deit_base_patch16_224.fb_in1k', dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)),
}


def _create_sdt2net(variant: str, pretrained: bool = False, **kwargs) -> SDT2Net:
    """Build an SDT2Net; `pretrained` loads the DeiT ImageNet weights through timm's hub loader."""
    pretrained_tag, arch = _VARIANTS[variant]
    for key in ('pretrained_cfg', 'pretrained_cfg_overlay', 'cache_dir'):
        kwargs.pop(key, None)  # timm.create_model passes these; the DeiT config below is used
    pretrained_cfg = get_pretrained_cfg(pretrained_tag)
    model = build_model_with_cfg(
        SDT2Net, f'sdt2net_{variant}_patch16_224', pretrained,
        pretrained_cfg=pretrained_cfg.to_dict() if pretrained_cfg is not None else None,
        pretrained_filter_fn=lambda state_dict, model: adapt_state_dict(state_dict, model),
        pretrained_strict=False, **dict(arch, **kwargs))
    # what timm.data.resolve_data_config reads: this model's own input size (DeiT's mean/std)
    img_size = model.patch_embed.img_size
    model.pretrained_cfg = dict(model.pretrained_cfg, input_size=(model.in_chans, *img_size),
                                num_classes=model.num_classes)
    return model


@register_model
def sdt2net_tiny_patch16_224(pretrained: bool = False, **kwargs) -> SDT2Net:
    return _create_sdt2net('tiny', pretrained, **kwargs)


@register_model
def sdt2net_small_patch16_224(pretrained: bool = False, **kwargs) -> SDT2Net:
    return _create_sdt2net('small', pretrained, **kwargs)


@register_model
def sdt2net_base_patch16_224(pretrained: bool = False, **kwargs) -> SDT2Net:
    return _create_sdt2net('base', pretrained, **kwargs)


# Names used by the official code and DiffRate's command lines.
@register_model
def vit_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> SDT2Net:
    return _create_sdt2net('tiny', pretrained, **kwargs)


@register_model
def vit_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> SDT2Net:
    return _create_sdt2net('small', pretrained, **kwargs)


@register_model
def vit_deit_base_patch16_224(pretrained: bool = False, **kwargs) -> SDT2Net:
    return _create_sdt2net('base', pretrained, **kwargs)


@register_model
def vit_deit_SDT2Net_small_patch16_224(pretrained: bool = False, **kwargs) -> SDT2Net:
    return _create_sdt2net('small', pretrained, **kwargs)
