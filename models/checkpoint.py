"""Adapting checkpoints (timm/DeiT or SDT2Net) to an SDT2Net model, and reading or knocking out a
trained EAB: pure state_dict functions."""
import re
from typing import Dict

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn


def unwrap_state_dict(checkpoint: Dict) -> Dict[str, torch.Tensor]:
    """The model weights of a checkpoint dict ('model'/'state_dict' wrappers, 'module.' prefixes)."""
    for key in ('model', 'state_dict', 'model_ema'):
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    state = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in checkpoint.items()}
    # NOTE checkpoints written before the EAB's shared module was named `scm` call it `scm_q`
    return {k.replace('.eab.scm_q.', '.eab.scm.'): v for k, v in state.items()}


def adapt_state_dict(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Return the network weights of a checkpoint that load into `model` (strict=False for
    missing SDT2Net parts and the rates).

    Removes classifier weights whose class count differs, drops what the model does not have (a
    distilled DeiT's distillation token and head), resamples the position embedding to the model's
    grid. Raises ValueError when the checkpoint belongs to a different architecture (any other
    shape mismatch).
    """
    state_dict = unwrap_state_dict(state_dict)
    target = model.state_dict()
    adapted, mismatched = {}, []
    for key, value in state_dict.items():
        # NOTE rates.* are the schedule search's state, not network weights: loading weights never
        # fixes, releases or moves a schedule (the run decides that; checkpoints store it apart).
        if key.startswith('rates.') or key not in target:  # e.g. a distilled DeiT's dist_token
            continue
        if key == 'pos_embed' and value.shape != target[key].shape and value.shape[-1] == target[key].shape[-1]:
            value = resample_abs_pos_embed(value, new_size=model.patch_embed.grid_size,
                                           num_prefix_tokens=0 if model.no_embed_class else model.num_prefix_tokens)
        if value.shape != target[key].shape:
            if key.startswith(('head.', 'head_dist.', 'ftf.fc.')):
                continue  # another class count: the classifier is trained anew
            mismatched.append(f'{key}: checkpoint {tuple(value.shape)} vs model {tuple(target[key].shape)}')
            continue
        adapted[key] = value
    if mismatched:
        raise ValueError('checkpoint does not fit this model: ' + '; '.join(mismatched[:3])
                         + (f' (+{len(mismatched) - 3} more)' if len(mismatched) > 3 else ''))
    if not any(k.startswith('blocks.') for k in adapted):
        raise ValueError('checkpoint holds no transformer block weights of this model')
    return adapted


# the last (zero-started) 1x1 convolution of each shift-conv module: blocks.<i>.eab.<scm>.reduce.*
EAB_LAST_CONV = re.compile(r'^(?:module\.)?blocks\.(\d+)\.eab\.\w+\.reduce\.(weight|bias)$')


def eab_last_conv_rms(weights: Dict[str, torch.Tensor]) -> Dict[int, float]:
    """Per block, the root mean square of its EAB's last convolution weights (0 at the start)."""
    squares: Dict[int, list] = {}
    for name, tensor in weights.items():
        match = EAB_LAST_CONV.match(name)
        if match and match.group(2) == 'weight':
            squares.setdefault(int(match.group(1)), []).append(tensor.float().pow(2).flatten())
    return {block: torch.cat(parts).mean().sqrt().item() for block, parts in sorted(squares.items())}


def without_eab(weights: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The weights with every EAB's last convolution (weights and biases) at zero: each EAB is the
    identity again, as at the start of fine-tuning. ValueError for weights without EAB."""
    names = [name for name in weights if EAB_LAST_CONV.match(name)]
    if not names:
        raise ValueError('it has no EAB (a model trained with --no-eab?)')
    return {**weights, **{name: torch.zeros_like(weights[name]) for name in names}}
