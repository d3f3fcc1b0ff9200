"""SDT2Net: a DeiT vision transformer with EAB, DTC and FTF, built on timm's VisionTransformer.

Blocks are injected through `block_fn`; token state (sizes, masks, patch owners) is passed from
block to block explicitly. `eab`, `ftf` and the compression (a schedule at full keep) can each be
switched off for ablations.
"""
from functools import partial
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models import build_model_with_cfg, get_pretrained_cfg, register_model
from timm.models.vision_transformer import Block, VisionTransformer

from .checkpoint import adapt_state_dict
from .eab import EfficientAttentionShift
from .flops import ModelShape, analytic_flops
from .ftf import SecondOrderHead
from .rates import CompressionRates
from .token_ops import TokenState, compress


class SDT2NetAttention(Attention):
    """timm attention plus EAB on q/k, proportional attention (log size) and keep masks.

    Evaluation uses fused attention; the class-token importance row is computed on its own.
    Training computes the attention map explicitly so that the straight-through keep mask
    passes gradients to the rate parameters.
    """

    def forward(self, x: torch.Tensor, state: TokenState, eab: Optional[EfficientAttentionShift] = None,
                need_importance: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """x: [B, N, C] -> (output [B, N, C], class-token attention on patches [B, N - 1] or None)."""
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, C).unbind(2)  # [B, N, C] each
        if eab is not None:
            q, k = eab(q, k, state)
        q, k, v = (t.view(B, N, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        q, k = self.q_norm(q), self.k_norm(k)
        # Proportional attention (ToMe): a token standing for s patches gets log(s) extra logit.
        bias = state.size.log().to(q.dtype).view(B, 1, 1, N) if state.size is not None else None

        importance = None
        if state.mask is not None:
            logits = (q * self.scale) @ k.transpose(-2, -1)  # [B, H, N, N]
            if bias is not None:
                logits = logits + bias
            # softmax restricted to alive keys, written so that d(attn)/d(mask) exists:
            # attn_ij = p_ij m_j / sum_k p_ik m_k with p the plain softmax (one fused kernel).
            # NOTE multiplying by the reciprocal of the [B, H, N, 1] sums is cheaper than a division
            # of the [B, H, N, N] map, forward and backward.
            weights = logits.softmax(dim=-1) * state.mask.to(logits.dtype)[:, None, None, :]
            attn = weights * weights.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(weights.dtype).tiny).reciprocal()
            if need_importance:
                importance = attn[:, :, 0, 1:].mean(dim=1)
            out = self.attn_drop(attn) @ v
        else:
            if self.fused_attn:
                out = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=bias, dropout_p=self.attn_drop.p if self.training else 0.)
            else:
                logits = (q * self.scale) @ k.transpose(-2, -1)
                if bias is not None:
                    logits = logits + bias
                out = self.attn_drop(logits.softmax(dim=-1)) @ v
            if need_importance:
                cls_logits = (q[:, :, :1] * self.scale) @ k.transpose(-2, -1)  # [B, H, 1, N]
                if bias is not None:
                    cls_logits = cls_logits + bias
                importance = cls_logits.softmax(dim=-1)[:, :, 0, 1:].mean(dim=1)
        out = self.norm(out.transpose(1, 2).reshape(B, N, C))
        return self.proj_drop(self.proj(out)), importance


class SDT2NetBlock(Block):
    """Pre-norm transformer block: attention (with EAB), token compression, MLP."""

    def __init__(self, dim: int, num_heads: int, *, eab_ratio: Optional[float] = None, eab_groups: int = 1,
                 **kwargs) -> None:
        kwargs['attn_layer'] = SDT2NetAttention
        super().__init__(dim, num_heads, **kwargs)
        self.eab = EfficientAttentionShift(dim, eab_ratio, eab_groups) if eab_ratio else None

    def forward(self, x: torch.Tensor, state: TokenState, kept: Optional[Tuple[int, int]] = None,
                keep_masks: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> Tuple[torch.Tensor, TokenState]:
        """x: [B, N, C]; kept: (prune, merge) kept counts with class token, None = no compression."""
        compresses = kept is not None and (keep_masks is not None or min(kept) < state.alive)
        attn_out, importance = self.attn(self.norm1(x), state, self.eab, need_importance=compresses)
        x = x + self.drop_path1(self.ls1(attn_out))
        if compresses:
            x, state = compress(x, state, importance, kept[0], kept[1], keep_masks)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, state


class SDT2Net(VisionTransformer):
    """VisionTransformer with learned token pruning/merging, EAB and a second-order head.

    Extra arguments: eab (bool), eab_ratio (SCM expansion, official 2), eab_groups (1, or e.g.
    num_heads for the cheap grouped variant), ftf (bool), ftf_dim (48), granularity (candidate step).
    """

    def __init__(self, *, eab: bool = True, eab_ratio: float = 2.0, eab_groups: int = 1, ftf: bool = True,
                 ftf_dim: int = 48, granularity: int = 4, **kwargs) -> None:
        kwargs.setdefault('global_pool', 'token')
        if kwargs['global_pool'] != 'token' or not kwargs.get('class_token', True) or kwargs.get('reg_tokens', 0):
            raise ValueError('SDT2Net needs a class token and token pooling (no register tokens)')
        block_fn = partial(SDT2NetBlock, eab_ratio=eab_ratio if eab else None, eab_groups=eab_groups)
        super().__init__(block_fn=block_fn, **kwargs)
        self.eab_ratio = eab_ratio if eab else 0.0
        self.eab_groups = eab_groups
        num_patches = self.patch_embed.num_patches
        self.rates = CompressionRates(len(self.blocks), num_patches, granularity)
        self.ftf = SecondOrderHead(self.embed_dim, self.num_classes, ftf_dim) if ftf else None

    # --- schedule -------------------------------------------------------------------------------
    def arch_parameters(self) -> List[torch.nn.Parameter]:
        """The compression-rate parameters."""
        return list(self.rates.parameters())

    def weight_parameters(self) -> List[torch.nn.Parameter]:
        """Every parameter that is not a compression-rate parameter."""
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def get_kept_num(self) -> Tuple[List[int], List[int]]:
        """(prune, merge) kept counts per block, class token included (197 = all at 224 px).

        A new model's rates are DiffRate's search start (uniform distributions, 101 of 197 kept
        from block 1 on); set_kept_num with full counts gives the dense model.
        """
        return self.rates.kept_num()

    def set_kept_num(self, prune: List[int], merge: List[int]) -> None:
        """Fix the schedule (evaluation, fine-tuning). Counts are clipped to never increase."""
        self.rates.set_kept_num(prune, merge)

    def shape(self) -> ModelShape:
        return ModelShape(
            embed_dim=self.embed_dim, depth=len(self.blocks), num_heads=self.blocks[0].attn.num_heads,
            mlp_hidden=self.blocks[0].mlp.fc1.out_features, num_patches=self.patch_embed.num_patches,
            patch_size=self.patch_embed.patch_size[0], in_chans=self.in_chans, num_classes=self.num_classes,
            eab_ratio=self.eab_ratio, eab_groups=self.eab_groups, ftf_dim=self.ftf.dim if self.ftf else 0)

    def flops(self) -> torch.Tensor:
        """FLOPs of one image under the current schedule (fvcore convention).

        In training mode the count is differentiable with respect to the rate parameters.
        """
        stages = self.rates.stage_patches() + 1  # [2 * (depth - 1)], class token included
        if not self.training:
            stages = stages.detach()
        return analytic_flops(self.shape(), stages[0::2], stages[1::2])

    # --- forward --------------------------------------------------------------------------------
    def forward_tokens(self, x: torch.Tensor, return_owners: bool = False) -> Tuple[torch.Tensor, TokenState, List[torch.Tensor]]:
        """Images [B, 3, H, W] -> (normed tokens [B, N, C], final state, per-block patch owners)."""
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        state = TokenState(alive=x.shape[1], grid_size=tuple(self.patch_embed.grid_size),
                           track_owner=return_owners or self.eab_ratio > 0)
        stages = self.rates.hard_stage_patches()  # kept patch counts, one host sync at most
        masks = self.rates.token_masks() if self.training else None  # [S, N + 1]
        owners = []
        for i, block in enumerate(self.blocks):
            kept = keep_masks = None
            if i > 0:
                kept = (stages[2 * i - 2] + 1, stages[2 * i - 1] + 1)
                if masks is not None:
                    keep_masks = (masks[2 * i - 2], masks[2 * i - 1])
            x, state = block(x, state, kept, keep_masks)
            if return_owners:
                owners.append(state.owners(x.shape[0], x.device))
        return self.norm(x), state, owners

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(x)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, state, _ = self.forward_tokens(x)
        logits = self.forward_head(tokens)
        if self.ftf is not None:
            size = state.sizes(tokens)[:, 1:]
            mask = state.mask[:, 1:] if state.mask is not None else None
            logits = logits + self.ftf(tokens[:, 1:], size, mask).to(logits.dtype)
        return logits

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        super().reset_classifier(num_classes, global_pool)
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
    return build_model_with_cfg(
        SDT2Net, f'sdt2net_{variant}_patch16_224', pretrained,
        pretrained_cfg=pretrained_cfg.to_dict() if pretrained_cfg is not None else None,
        pretrained_filter_fn=lambda state_dict, model: adapt_state_dict(state_dict, model),
        pretrained_strict=False, **dict(arch, **kwargs))


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
