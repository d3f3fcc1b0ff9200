"""timm's model contract (in the style of timm's tests/test_models.py), with FTF on."""
import pytest
import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, resolve_data_config

from conftest import randomize_zero_initialised

NAME = 'sdt2net_tiny_patch16_224'


def create(**kwargs):
    model = timm.create_model(NAME, img_size=64, drop_path_rate=0.0, **kwargs)
    randomize_zero_initialised(model)
    return model


@pytest.mark.parametrize('train', [False, True])
@pytest.mark.parametrize('fixed', [False, True])
def test_forward_equals_forward_head_of_forward_features(train, fixed):
    model = create(num_classes=7)
    if fixed:
        model.set_kept_num([17] + [13] * 11, [17, 11] + [9] * 10)
    model.train(train)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        direct = model(x)
        features = model.forward_features(x)
        composed = model.forward_head(features)
    assert direct.shape == (3, 7)
    torch.testing.assert_close(composed, direct)
    pre_logits = model.forward_head(features, pre_logits=True)
    assert pre_logits.shape == (3, model.head_hidden_size) and model.head_hidden_size == 192 + 48 * 49 // 2


def test_num_classes_zero_gives_pooled_features_of_both_heads():
    model = create(num_classes=0).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = model(x)
    assert features.shape == (2, model.head_hidden_size)
    torch.testing.assert_close(features, model.forward_head(model.forward_features(x), pre_logits=True))


def test_reset_classifier_with_ftf():
    model = create(num_classes=7).eval()
    x = torch.randn(2, 3, 64, 64)
    model.reset_classifier(4)
    assert model(x).shape == (2, 4) and model.ftf.fc.out_features == 4
    model.reset_classifier(0)
    assert model(x).shape == (2, model.head_hidden_size)


def test_forward_intermediates_raises_one_clear_error():
    with pytest.raises(NotImplementedError, match='forward_tokens'):
        create(num_classes=3).forward_intermediates(torch.randn(1, 3, 64, 64))


def test_pretrained_cfg_resolves_the_data_config():
    model = timm.create_model(NAME, img_size=112, num_classes=45)
    config = resolve_data_config({}, model=model)
    assert config['input_size'] == (3, 112, 112)
    assert tuple(config['mean']) == IMAGENET_DEFAULT_MEAN
    assert model.pretrained_cfg['classifier'] == 'head'
