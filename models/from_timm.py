"""SDT2Net from any timm VisionTransformer: the constructor arguments read off a built model, the
conversion that keeps its weights (`from_vit`), and `sdt2net_<NAME>` registered with timm for
every VisionTransformer architecture NAME of timm's vision_transformer and deit modules.

    timm.create_model('sdt2net_vit_small_patch14_reg4_dinov2.lvd142m', pretrained=True, img_size=224,
                      num_classes=45, eab=False)
    model = from_vit(timm.create_model('deit3_small_patch16_224', pretrained=True), ftf=False)

timm builds and loads the ViT exactly as for `timm.create_model(NAME, ...)` (the hub,
`pretrained_cfg_overlay=dict(file=...)`, its checkpoint filters, position-embedding resampling);
the SDT2Net then takes its configuration and weights.
"""
import inspect
import sys
from functools import partial
from typing import Any, Callable, Dict, Optional, Tuple

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import Attention, LayerScale, Mlp, PatchDropout, PatchEmbed
from timm.models import register_model
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from .sdt2net import SDT2Net

# SDT2Net's own keyword arguments; the rest go to timm's VisionTransformer.
SDT2NET_ARGS = tuple(name for name, p in inspect.signature(SDT2Net.__init__).parameters.items()
                     if p.kind == p.KEYWORD_ONLY)
VIT_MODULES = ('vision_transformer', 'deit')


def _norm(module: nn.Module) -> Optional[Callable]:
    """The norm layer factory that builds `module` again (its type and eps); None for Identity."""
    if isinstance(module, nn.Identity):
        return None
    eps = getattr(module, 'eps', None)
    return partial(type(module), eps=eps) if eps is not None else type(module)


def vit_arguments(vit: VisionTransformer) -> Dict[str, Any]:
    """The VisionTransformer arguments that build `vit`'s architecture again, read off the model
    (weights aside). Raises ValueError when the rebuilt architecture would differ in any module,
    shape or setting (a configuration these arguments do not capture)."""
    if type(vit) not in (VisionTransformer, VisionTransformerDistilled):
        raise ValueError(f'{type(vit).__name__} is not timm\'s VisionTransformer (or its distilled DeiT)')
    block = vit.blocks[0]
    # the block first: parallel blocks (ViT-18x2, -xp) have no `attn` or `mlp` to look at
    parts = (('block', lambda: block, Block), ('attention', lambda: block.attn, Attention),
             ('MLP', lambda: block.mlp, Mlp), ('patch embedding', lambda: vit.patch_embed, PatchEmbed))
    for what, module, expected in parts:
        if type(module()) is not expected:
            raise ValueError(f'its {what} is {type(module()).__name__}; SDT2Net builds on timm\'s {expected.__name__}')
    if not (isinstance(block.attn.norm, nn.Identity) and isinstance(block.mlp.norm, nn.Identity)):
        raise ValueError('its blocks norm the attention and MLP outputs (scale_attn_norm / scale_mlp_norm, '
                         'BEiT3\'s layout), which the FLOPs count does not follow')
    if isinstance(vit.patch_drop, PatchDropout):
        raise ValueError('patch dropout (patch_drop_rate > 0) drops patches that the token schedule counts')
    drop_path = getattr(vit.blocks[-1].drop_path1, 'drop_prob', 0.0)  # the last block's is the rate
    arguments = dict(
        img_size=tuple(vit.patch_embed.img_size), patch_size=tuple(vit.patch_embed.patch_size),
        in_chans=vit.patch_embed.proj.in_channels, num_classes=vit.num_classes, global_pool=vit.global_pool,
        embed_dim=vit.embed_dim, depth=len(vit.blocks), num_heads=block.attn.num_heads,
        mlp_ratio=block.mlp.fc1.out_features / vit.embed_dim, qkv_bias=block.attn.qkv.bias is not None,
        qk_norm=not isinstance(block.attn.q_norm, nn.Identity), proj_bias=block.attn.proj.bias is not None,
        init_values=1.0 if isinstance(block.ls1, LayerScale) else None,  # the values come with the weights
        class_token=vit.has_class_token, pos_embed='none' if vit.pos_embed is None else 'learn',
        no_embed_class=vit.no_embed_class, reg_tokens=vit.num_reg_tokens,
        pre_norm=not isinstance(vit.norm_pre, nn.Identity),
        final_norm=not (isinstance(vit.norm, nn.Identity) and isinstance(vit.fc_norm, nn.Identity)),
        fc_norm=not isinstance(vit.fc_norm, nn.Identity), pool_include_prefix=vit.pool_include_prefix,
        dynamic_img_size=vit.dynamic_img_size, drop_rate=vit.head_drop.p, pos_drop_rate=vit.pos_drop.p,
        proj_drop_rate=block.attn.proj_drop.p, attn_drop_rate=block.attn.attn_drop.p, drop_path_rate=drop_path,
        norm_layer=_norm(block.norm1), embed_norm_layer=_norm(vit.patch_embed.norm),
        act_layer=type(block.mlp.act))
    with torch.device('meta'):  # the architecture again, without memory or initialisation
        rebuilt = type(vit)(**arguments, weight_init='skip')
    for name in ('num_prefix_tokens', 'no_embed_class', 'global_pool', 'has_class_token', 'dynamic_img_size'):
        if getattr(rebuilt, name) != getattr(vit, name):
            raise ValueError(f'cannot read its configuration: {name} {getattr(vit, name)!r} would be rebuilt as '
                             f'{getattr(rebuilt, name)!r}')
    ours, theirs = repr(rebuilt).splitlines(), repr(vit).splitlines()
    if ours != theirs or {k: v.shape for k, v in rebuilt.state_dict().items()} != \
            {k: v.shape for k, v in vit.state_dict().items()}:
        differs = next((f'{a.strip()} would be rebuilt as {b.strip()}' for a, b in zip(theirs, ours) if a != b),
                       'its parameters differ in shape')
        raise ValueError(f'cannot read its configuration: {differs}')
    return arguments


def from_vit(vit: VisionTransformer, **kwargs) -> SDT2Net:
    """SDT2Net with `vit`'s architecture and weights, plus EAB / FTF / DTC as `kwargs` set them
    (SDT2Net's keyword arguments). With EAB and FTF off, or at their zero start, and every token
    kept, it computes what `vit` computes. Raises ValueError for a ViT SDT2Net cannot follow."""
    unknown = sorted(set(kwargs) - set(SDT2NET_ARGS))
    if unknown:
        raise ValueError(f'unknown SDT2Net arguments {unknown}; known: {", ".join(SDT2NET_ARGS)}')
    arguments = vit_arguments(vit)
    model = SDT2Net(**arguments, distilled=isinstance(vit, VisionTransformerDistilled), **kwargs)
    missing, unexpected = model.load_state_dict(vit.state_dict(), strict=False)
    own = ('rates.', 'ftf.') + tuple(f'blocks.{i}.eab.' for i in range(len(model.blocks)))
    if unexpected or any(not key.startswith(own) for key in missing):
        raise ValueError(f'weights that do not fit: unexpected {unexpected[:3]}, missing '
                         f'{[k for k in missing if not k.startswith(own)][:3]}')
    cfg = dict(getattr(vit, 'pretrained_cfg', None) or {})
    model.pretrained_cfg = dict(cfg, input_size=(model.in_chans, *model.patch_embed.img_size),
                                num_classes=model.num_classes)
    return model.to(next(vit.parameters()).device).train(vit.training)


def input_normalization(model_name: str) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """(mean, std) the weights of `model_name` expect: the pretrained config of the timm ViT that
    `sdt2net_<NAME>[.tag]` stands for (CLIP's and others differ from ImageNet's); ImageNet's for
    SDT2Net's own DeiT names."""
    if model_name.startswith('sdt2net_') and getattr(sys.modules[__name__], model_name.split('.')[0], None):
        try:
            cfg = timm.models.get_pretrained_cfg(model_name[len('sdt2net_'):])
        except RuntimeError:  # an unknown tag: timm.create_model names it
            cfg = None
        if cfg is not None:
            return tuple(cfg.mean), tuple(cfg.std)
    return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)


def _entrypoint(vit_name: str) -> Callable[..., SDT2Net]:
    """timm entry point of `sdt2net_<vit_name>`: timm builds (and loads) the ViT, SDT2Net takes it."""
    def create(pretrained: bool = False, **kwargs) -> SDT2Net:
        ours = {name: kwargs.pop(name) for name in SDT2NET_ARGS if name in kwargs}
        # pretrained_cfg (a tag such as 'lvd142m' after the name's dot), pretrained_cfg_overlay and
        # cache_dir reach timm's own builder untouched: pretrained weights load exactly as in timm
        vit = timm.create_model(vit_name, pretrained=pretrained, **kwargs)
        return from_vit(vit, **ours)
    create.__name__ = f'sdt2net_{vit_name}'
    create.__qualname__ = create.__name__
    create.__module__ = __name__
    create.__doc__ = f'SDT2Net from timm\'s {vit_name}.'
    return create


def register_vits() -> None:
    """Register `sdt2net_<NAME>` for every architecture of timm's ViT modules (names SDT2Net's
    own DeiT builders already hold stay theirs)."""
    module = sys.modules[__name__]
    for vit_name in sorted({n for m in VIT_MODULES for n in timm.list_models(module=m)}):
        name = f'sdt2net_{vit_name}'
        if not timm.is_model(name):
            setattr(module, name, register_model(_entrypoint(vit_name)))


register_vits()
