import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import models  # noqa: E402,F401  (registers the SDT2Net models with timm)

REFERENCE_SCHEDULES = os.path.join(ROOT, '..', 'shared', 'reference', 'diffrate_compression_rate.json')


def small_sdt2net(trained_like: bool = True, **kwargs) -> models.SDT2Net:
    """A small SDT2Net (64 patches of an 64 px image) for fast CPU tests.

    trained_like: give the layers that start at zero (the EAB's last conv, the FTF classifier)
    random weights, as after training; at zero the EAB is the identity and the FTF adds nothing,
    and a test of either would pass whatever they compute.
    """
    config = dict(img_size=64, patch_size=8, embed_dim=40, depth=4, num_heads=2, num_classes=5,
                  granularity=4, eab=True, ftf=True, ftf_dim=12)
    config.update(kwargs)
    model = models.SDT2Net(**config)
    if trained_like:
        randomize_zero_initialised(model)
    return model


def randomize_zero_initialised(model: models.SDT2Net) -> None:
    with torch.no_grad():
        for block in model.blocks:
            for scm in (block.eab.scm, block.eab.scm_k) if block.eab is not None else ():
                if scm is not None:
                    scm.reduce.weight.normal_(0, 0.1)
                    scm.reduce.bias.normal_(0, 0.1)
        if model.ftf is not None and model.num_classes:
            model.ftf.fc.weight.normal_(0, 0.05)


def sharpen_attention(model: torch.nn.Module, scale: float = 4.0) -> None:
    """Scale q/k weights so that importance scores are well separated (no near-ties in sorting)."""
    with torch.no_grad():
        for block in model.blocks:
            dim = block.attn.qkv.weight.shape[1]
            block.attn.qkv.weight[:2 * dim] *= scale


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def exact_masked_softmax(monkeypatch):
    """DiffRate's eps off (models.sdt2net.SOFTMAX_EPS): a masked key then weighs exactly 0, so a
    masked forward equals the evaluation forward to rounding; with it, masked keys weigh up to
    eps / N each."""
    monkeypatch.setattr(models.sdt2net, 'SOFTMAX_EPS', 0.0)
