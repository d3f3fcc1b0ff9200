"""FLOPs of SDT2Net: an analytic count (differentiable in the kept numbers) and fvcore's count.

Convention (fvcore's): one multiply-add of a matrix product or convolution is one FLOP; a
LayerNorm costs 5 per element, an inference BatchNorm 2; elementwise activations, softmax,
sorting, gathers and the LAPACK calls of the Pade root's inverse (24 x 24 Cholesky factorisations
and inverses, ~0.02 MFLOPs) are not counted.
"""
import warnings
from dataclasses import dataclass
from typing import Any, List

import torch
from torch import nn

from .sqrtm import pade_sqrtm_flops


@dataclass(frozen=True)
class ModelShape:
    embed_dim: int
    depth: int
    num_heads: int
    mlp_hidden: int
    num_patches: int
    patch_size: int
    in_chans: int
    num_classes: int
    eab: bool = False
    eab_ratio: float = 2.0  # the SCM's expansion
    eab_groups: int = 1
    ftf_dim: int = 0        # 0 = FTF off
    num_prefix: int = 1     # class token, then distillation or register tokens
    norm_pre: bool = False  # a norm of the embedded tokens before the blocks (CLIP)
    qk_norm: bool = False   # norms of q and k in attention
    token_norm: bool = True  # the final norm over every token (DeiT); off with fc_norm / final_norm=False
    fc_norm: bool = False   # the final norm over the pooled features (average pooling)
    heads: int = 1          # linear classifiers on the pooled features (2: DeiT's distillation head)
    rank_by_class: bool = True  # patches ranked by the class token's attention row (else by the map's means)
    pool_mlp_hidden: int = 0    # the MLP width of an attention-pooling head (SigLIP's 'map'); 0: none


def analytic_flops(shape: ModelShape, prune: torch.Tensor, merge: torch.Tensor) -> torch.Tensor:
    """FLOPs of one image.

    prune, merge: [depth - 1] kept counts (prefix tokens included) of blocks 1..depth-1, as float
    tensors; gradients flow through them. Block 0 is dense.
    """
    C, P, prefix = shape.embed_dim, shape.num_patches, shape.num_prefix
    prune, merge = prune.double(), merge.double()
    # new_full fills on the device; new_tensor would copy from the host (a GPU sync per step)
    dense = prune.new_full((), P + prefix)
    total = prune.new_full((), P * C * shape.in_chans * shape.patch_size ** 2)  # patch embedding
    if shape.norm_pre:
        total = total + 5 * dense * C
    # EAB: two 1x1 convs (C -> hidden -> C) per SCM on the patch tokens present, for q and k
    # (its shifts move memory: no multiply-adds)
    eab_per_token = 4 * C * int(C * shape.eab_ratio) / shape.eab_groups if shape.eab else 0.0
    n_in = dense
    for block in range(shape.depth):
        if block == 0:
            p = m = after = dense
            importance = 0.0
        else:
            p, m = prune[block - 1], merge[block - 1]
            # NOTE m tokens leave the block (m <= p). As DiffRate's ste_min, the gradient of that
            # count reaches both the prune and the merge count: the budget presses on both, and
            # the task loss decides which of the two removes a token.
            after = m + (p - p.detach())
            compresses = (m.detach() < n_in.detach()).double()
            importance = compresses * n_in * C if shape.rank_by_class else 0.0  # class-token attention row
        total = total + 5 * n_in * C                     # norm1
        total = total + 4 * n_in * C * C                 # qkv + proj
        if shape.qk_norm:
            total = total + 10 * n_in * C                # q and k norms
        total = total + eab_per_token * (n_in - prefix)  # shift-conv modules on q and k
        total = total + 2 * n_in * n_in * C              # q @ k^T and attn @ v
        total = total + importance + (p - m) * (m - prefix) * C  # sorting row, similarity to the kept patch tokens
        total = total + 5 * after * C + 2 * after * C * shape.mlp_hidden  # norm2 + MLP
        n_in = after
    if shape.token_norm:
        total = total + 5 * n_in * C                     # final norm of every token
    if shape.pool_mlp_hidden:  # one latent query attends to the patch tokens, then proj, norm and MLP
        patches = n_in - prefix
        total = total + 2 * patches * C * C + 2 * patches * C          # keys and values, q @ k^T, attn @ v
        total = total + 2 * C * C + 5 * C + 2 * C * shape.pool_mlp_hidden  # query, proj, norm, MLP
    if shape.fc_norm:
        total = total + 5 * C                            # final norm of the pooled features
    total = total + shape.heads * C * shape.num_classes  # linear head(s)
    if shape.ftf_dim:
        d = shape.ftf_dim
        patches = n_in - prefix
        total = total + patches * (C * d + 2 * d + d * d)     # reduction, BN, covariance
        total = total + pade_sqrtm_flops(d) + d * (d + 1) // 2 * shape.num_classes  # Pade root, classifier
    return total


def _sdpa_flops(inputs: List[Any], outputs: List[Any]) -> int:
    """fvcore handle for aten::scaled_dot_product_attention: q @ k^T plus attn @ v."""
    from fvcore.nn.jit_handles import get_shape
    q, k, v = (get_shape(t) for t in inputs[:3])
    batch = 1
    for dim in q[:-2]:
        batch *= dim
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


def _baddbmm_flops(inputs: List[Any], outputs: List[Any]) -> int:
    """fvcore handle for aten::baddbmm(_) (input + batch1 @ batch2): the product's multiply-adds."""
    from fvcore.nn.jit_handles import get_shape
    batch, n, k = get_shape(inputs[1])
    return batch * n * k * get_shape(inputs[2])[-1]


def fvcore_flops(model: nn.Module, img_size: int, device: torch.device = torch.device('cpu')) -> float:
    """fvcore's count of the evaluation model for one image (needs fvcore installed)."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)  # fvcore calls the deprecated torch.jit.script
        from fvcore.nn import FlopCountAnalysis
    was_training = model.training
    model.eval()
    image = torch.zeros(1, model.in_chans, img_size, img_size, device=device)
    with torch.no_grad():
        analysis = FlopCountAnalysis(model, image)
        analysis.set_op_handle('aten::scaled_dot_product_attention', _sdpa_flops)
        analysis.set_op_handle('aten::baddbmm', _baddbmm_flops)
        analysis.set_op_handle('aten::baddbmm_', _baddbmm_flops)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        total = float(analysis.total())
    model.train(was_training)
    return total
