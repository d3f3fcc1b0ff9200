"""Adapting checkpoints (timm/DeiT or SDT2Net) to an SDT2Net model: a pure state_dict function."""
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
