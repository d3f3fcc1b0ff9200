"""SDT2Net on the ViTs people start from: every family of timm VisionTransformer, at small depth and
width with random weights (nothing downloaded), against timm's own model with the same weights."""
import importlib.util
import json
import re
from dataclasses import replace

import pytest
import timm
import torch
from timm.layers import LayerScale, SwiGLU

import export
import main as entry
import models
import predict
from conftest import randomize_zero_initialised
from test_pipeline import make_image_folder
from workflow.runs import create_model
from workflow.schedule_file import load_schedule

HAVE_ONNX = all(importlib.util.find_spec(name) for name in ('onnx', 'onnxruntime', 'onnxscript'))
SMALL = dict(depth=3, embed_dim=48, num_heads=2, num_classes=5)
# family: (timm name, its extra arguments), each with what sets it apart
FAMILIES = {
    'augreg': ('vit_small_patch16_224.augreg_in21k', dict(img_size=64)),        # ImageNet-21k ViT
    'deit3': ('deit3_small_patch16_224', dict(img_size=64)),                     # layer scale, no class pos-embed
    'dinov2': ('vit_small_patch14_dinov2', dict(img_size=56)),                   # patch 14, layer scale
    'dinov2_reg': ('vit_small_patch14_reg4_dinov2', dict(img_size=56)),          # 4 register tokens
    'clip': ('vit_base_patch16_clip_quickgelu_224', dict(img_size=64)),          # norm_pre, QuickGELU, LN eps 1e-5
    'mae_avg': ('vit_base_patch16_224.mae', dict(img_size=64, global_pool='avg')),  # average pooling, fc_norm
    'deit_distilled': ('deit_tiny_distilled_patch16_224', dict(img_size=64)),    # class + distillation token
    'siglip': ('vit_base_patch16_siglip_224', dict(img_size=64)),                # no class token, attention pooling
    'siglip_gap': ('vit_base_patch16_siglip_gap_224', dict(img_size=64)),        # no class token, average pooling
    'gap_reg': ('vit_medium_patch16_reg4_gap_256', dict(img_size=64)),           # 4 registers, no class token, avg
    'map_reg': ('vit_so150m_patch16_reg4_map_256', dict(img_size=64)),           # 4 registers, attention pooling
}
PREFIX = {'augreg': 1, 'deit3': 1, 'dinov2': 1, 'dinov2_reg': 5, 'clip': 1, 'mae_avg': 1, 'deit_distilled': 2,
          'siglip': 0, 'siglip_gap': 0, 'gap_reg': 4, 'map_reg': 4}
WITHOUT_CLASS_TOKEN = ['siglip', 'siglip_gap', 'gap_reg', 'map_reg']


def timm_vit(family: str) -> torch.nn.Module:
    """timm's model with random weights that make every part count (layer scales and prefix tokens
    far from their near-zero initialisation)."""
    name, extra = FAMILIES[family]
    vit = timm.create_model(name, **SMALL, **extra)
    with torch.no_grad():
        for module in vit.modules():
            if isinstance(module, LayerScale):
                module.gamma.uniform_(0.5, 1.0)
        for token in (vit.cls_token, vit.reg_token, getattr(vit, 'dist_token', None)):
            if token is not None:
                token.normal_()
    return vit.eval()


def image(family: str, batch: int = 3, dtype=torch.float32) -> torch.Tensor:
    size = FAMILIES[family][1]['img_size']
    return torch.randn(batch, 3, size, size, dtype=dtype)


def compressed(model: models.SDT2Net) -> models.Schedule:
    """Blocks 1 and 2 each prune 2 patch tokens and merge 3 (16 patches: 6 left)."""
    full = model.patch_embed.num_patches + model.num_prefix_tokens
    return models.Schedule([full, full - 2, full - 7], [full, full - 5, full - 10])


@pytest.mark.parametrize('family', FAMILIES)
@pytest.mark.parametrize('train', [False, True])
@pytest.mark.parametrize('parts', [False, True])
def test_full_keep_equals_timms_model(family, train, parts):
    """By name (timm builds the ViT, SDT2Net takes its configuration) with timm's weights loaded:
    every token kept, EAB and FTF off or at their zero start, the outputs are timm's."""
    vit = timm_vit(family)
    name, extra = FAMILIES[family]
    ours = timm.create_model(f'sdt2net_{name}', **SMALL, **extra, eab=parts, ftf=parts)
    missing, unexpected = ours.load_state_dict(vit.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(('rates.', 'ftf.')) or '.eab.' in k for k in missing)
    assert ours.num_prefix_tokens == PREFIX[family]
    ours.fix_schedule(models.Schedule.dense(3, ours.patch_embed.num_patches, ours.num_prefix_tokens))
    vit.train(train), ours.train(train)
    x = image(family)
    with torch.no_grad():
        assert (ours(x) - vit(x)).abs().max() <= 1e-5


@pytest.mark.parametrize('family', FAMILIES)
def test_conversion_of_a_built_model_keeps_its_weights(family):
    vit = timm_vit(family)
    ours = models.from_vit(vit, eab=False, ftf=False)
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in vit.state_dict().items())
    ours.fix_schedule(models.Schedule.dense(3, ours.patch_embed.num_patches, ours.num_prefix_tokens))
    x = image(family)
    with torch.no_grad():
        assert (ours(x) - vit(x)).abs().max() <= 1e-5


@pytest.mark.parametrize('family', FAMILIES)
def test_prefix_tokens_are_never_pruned_or_merged(family):
    """Under a compressed schedule the prefix tokens stay in front with size 1, no patch is ever
    owned by one, and the masked training forward equals the evaluation forward."""
    model = models.from_vit(timm_vit(family), eab=True, ftf=True).double()
    randomize_zero_initialised(model)
    schedule = compressed(model)
    model.fix_schedule(schedule)
    prefix, patches = model.num_prefix_tokens, model.patch_embed.num_patches
    x = image(family, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        tokens, state, owners = model.forward_tokens(x, return_owners=True)
        evaluated = model(x)
    assert tokens.shape[1] == schedule.merge[-1] < patches + prefix
    assert torch.equal(state.size[:, :prefix], torch.ones_like(state.size[:, :prefix]))
    assert state.size[:, prefix:].sum(dim=1).max() <= patches and state.size.max() > 1  # merged and pruned
    assert all((owner >= prefix).all() for owner in owners)
    model.train()
    model.ftf.bn.eval()  # batch statistics are a training-only difference, not a compression one
    with torch.no_grad():
        masked = model(x)
    torch.testing.assert_close(masked, evaluated, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize('family', ['dinov2_reg', 'deit_distilled', 'augreg'])
def test_importance_is_the_class_tokens_attention_on_the_patches(family):
    model = models.from_vit(timm_vit(family), eab=False, ftf=False).eval()
    assert model.importance == 'class'
    attn, prefix = model.blocks[1].attn, model.num_prefix_tokens
    x = torch.randn(2, prefix + model.patch_embed.num_patches, model.embed_dim)
    state = models.sdt2net.TokenState(alive=x.shape[1], grid_size=tuple(model.patch_embed.grid_size), prefix=prefix)
    with torch.no_grad():
        _, importance = attn(x, state, importance='class')
        q, k, _ = attn.qkv(x).view(2, x.shape[1], 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        expected = ((q[:, :, :1] @ k.transpose(-2, -1)) * attn.scale).softmax(-1)[:, :, 0, prefix:].mean(1)
    assert importance.shape == (2, model.patch_embed.num_patches)
    torch.testing.assert_close(importance, expected)


@pytest.mark.parametrize('family', WITHOUT_CLASS_TOKEN)
def test_without_a_class_token_importance_is_the_attention_the_patches_receive(family):
    """Evaluation: the mean over heads and queries of the attention map's columns; training: only
    the alive queries vote (a masked query attends to itself alone)."""
    model = models.from_vit(timm_vit(family), eab=False, ftf=False).eval()
    assert model.importance == 'received' and model.shape().rank_by_class is False
    attn, prefix = model.blocks[1].attn, model.num_prefix_tokens
    n = prefix + model.patch_embed.num_patches
    x = torch.randn(2, n, model.embed_dim)
    state = models.sdt2net.TokenState(alive=n, grid_size=tuple(model.patch_embed.grid_size), prefix=prefix)
    with torch.no_grad():
        _, importance = attn(x, state, importance='received')
        q, k, _ = attn.qkv(x).view(2, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        amap = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(-1)  # [B, H, N, N]
    torch.testing.assert_close(importance, amap.mean(dim=(1, 2))[:, prefix:])
    mask = torch.ones(2, n)
    mask[:, -3:] = 0  # the last three tokens masked: keys hidden, queries silent
    with torch.no_grad():
        _, masked = attn(x, replace(state, mask=mask), importance='received')
    logits = (q @ k.transpose(-2, -1)) * attn.scale
    expected = logits[..., :n - 3, :n - 3].softmax(-1).mean(dim=(1, 2))[:, prefix:]  # alive queries and keys
    torch.testing.assert_close(masked[:, :n - 3 - prefix], expected)
    with pytest.raises(ValueError, match='class token'):
        models.from_vit(timm_vit(family), importance='class')


@pytest.mark.parametrize('family', ['siglip', 'map_reg'])
def test_attention_pooling_counts_a_merged_token_as_the_tokens_it_holds(family):
    """ToMe's proportional attention in the pooling head: one token of size 3 pools exactly as
    three copies of it; a masked token (training) is ignored as if removed."""
    model = models.from_vit(timm_vit(family), eab=False, ftf=False).eval()
    prefix = model.num_prefix_tokens
    a, b = torch.randn(2, 1, model.embed_dim), torch.randn(2, 1, model.embed_dim)
    prefix_tokens = torch.randn(2, prefix, model.embed_dim)
    merged = torch.cat([prefix_tokens, a, b], dim=1)
    copies = torch.cat([prefix_tokens, a, b, b, b], dim=1)
    sizes = torch.tensor([1.0] * prefix + [1.0, 3.0]).expand(2, -1)[..., None]
    state = models.sdt2net.TokenState(alive=prefix + 2, grid_size=(4, 4), prefix=prefix, size=sizes.clone())
    with torch.no_grad():
        torch.testing.assert_close(model._pool(merged, state), model._pool(copies, None))
        noise = torch.cat([merged, torch.randn(2, 1, model.embed_dim)], dim=1)
        masked = replace(state, alive=prefix + 3, size=torch.cat([sizes, torch.full((2, 1, 1), 5.0)], dim=1),
                         mask=torch.tensor([1.0] * (prefix + 2) + [0.0]).expand(2, -1))
        torch.testing.assert_close(model._pool(noise, masked), model._pool(copies, None))
    assert model._pool(copies, None).shape == (2, model.embed_dim)


def test_a_vit_sdt2net_cannot_follow_is_refused_in_one_line(capsys):
    with pytest.raises(ValueError, match='ParallelScalingBlock'):
        timm.create_model('sdt2net_vit_base_patch16_xp_224', **SMALL, img_size=64)
    code = entry.run(['--data-set', 'synthetic', '--model', 'sdt2net_vit_base_patch16_xp_224',
                      '--input-size', '64', '--epochs', '1'])
    err = capsys.readouterr().err
    assert code != 0 and 'Traceback' not in err
    assert len(err.strip().splitlines()) == 1 and 'ParallelScalingBlock' in err


def test_every_registered_name_builds_or_is_refused_in_one_line_naming_the_part():
    """timm's registry walk: each sdt2net_* name builds on the meta device (one block, to keep it
    fast: what is refused is the kind of block, attention, MLP or pooling, not the depth) or raises
    one ValueError line that names what SDT2Net cannot follow, never another error."""
    names = timm.list_models('sdt2net_*')
    built, refused = [], {}
    for name in names:
        try:
            with torch.device('meta'):
                timm.create_model(name, depth=1)
            built.append(name)
        except ValueError as error:
            refused[name] = str(error)
    assert all('\n' not in why and len(why) < 300 for why in refused.values()), refused
    parts = ('Block', 'Attention', 'Mlp', 'BEiT3', 'dynamic_img_size', 'pool_include_prefix')
    assert all(any(part in why for part in parts) for why in refused.values()), refused
    for family in ('siglip', 'siglip_gap', 'gap_reg', 'map_reg', 'dinov2_reg', 'deit3'):
        assert f'sdt2net_{FAMILIES[family][0].split(".")[0]}' in built
    assert {'sdt2net_vit_so400m_patch14_siglip_384', 'sdt2net_vit_base_patch16_siglip_gap_224'} <= set(built)
    assert len(built) + len(refused) == len(names) and len(built) > len(refused)


@pytest.mark.parametrize('arguments,words', [
    (dict(mlp_layer=SwiGLU), 'SwiGLU'), (dict(patch_drop_rate=0.1), 'patch'),
    (dict(global_pool='max'), 'max'), (dict(dynamic_img_size=True), 'dynamic')])
def test_what_sdt2net_cannot_follow_is_refused_by_name_and_by_conversion(arguments, words):
    with pytest.raises(ValueError, match=words):
        timm.create_model('sdt2net_vit_small_patch16_224', **SMALL, img_size=64, **arguments)
    with pytest.raises(ValueError, match=words):
        models.from_vit(timm.create_model('vit_small_patch16_224', **SMALL, img_size=64, **arguments))


def test_class_token_pooling_without_a_class_token_is_refused():
    with pytest.raises(ValueError, match='without a class token'):
        models.SDT2Net(class_token=False, global_pool='token', **SMALL, img_size=64)


def test_average_pooling_weighs_merged_tokens_by_size():
    model = models.from_vit(timm_vit('mae_avg'), eab=False, ftf=False)
    tokens = torch.randn(2, 7, model.embed_dim)
    size = torch.tensor([[1, 3, 1, 2, 4, 1, 5], [1, 1, 1, 1, 1, 1, 9]], dtype=torch.float32)[..., None]
    mask = torch.tensor([[1, 1, 1, 1, 0, 1, 1], [1, 1, 1, 1, 1, 1, 0]], dtype=torch.float32)
    state = models.sdt2net.TokenState(alive=7, grid_size=(4, 4), size=size, mask=mask)
    weight = (size[:, 1:, 0] * mask[:, 1:])[..., None]
    expected = (tokens[:, 1:] * weight).sum(1) / weight.sum(1)
    torch.testing.assert_close(model._pool(tokens, state), expected)
    # at full keep: timm's mean of the patch tokens
    torch.testing.assert_close(model._pool(tokens, None), tokens[:, 1:].mean(1))


@pytest.mark.parametrize('family', FAMILIES)
@pytest.mark.parametrize('keep', ['dense', 'compressed'])
def test_analytic_flops_equal_fvcores_count(family, keep):
    model = models.from_vit(timm_vit(family), eab=True, ftf=True).eval()
    schedule = compressed(model) if keep == 'compressed' else \
        models.Schedule.dense(3, model.patch_embed.num_patches, model.num_prefix_tokens)
    model.fix_schedule(schedule)
    analytic = float(model.flops())
    counted = models.fvcore_flops(model, FAMILIES[family][1]['img_size'])
    assert abs(analytic - counted) <= 1e-3 * counted, (analytic, counted)


def test_token_counts_and_flops_range_follow_the_model():
    """DINOv2-S/14 with registers at 224 px: 256 patches behind 5 prefix tokens."""
    model = timm.create_model('sdt2net_vit_small_patch14_reg4_dinov2', img_size=224, eab=False, ftf=False)
    shape = model.shape()
    assert (shape.num_patches, shape.num_prefix, shape.patch_size) == (256, 5, 14)
    dense = models.Schedule.dense(shape.depth, 256, 5)
    assert dense.prune == (261,) * 12
    low, high = models.flops_range(shape, 4)
    assert high == pytest.approx(dense.flops(shape) / 1e9) and low < high / 4
    smallest = models.smallest_schedule(shape, 4)
    assert smallest.merge[-1] == 5 + 4  # the smallest candidate: 256 - 63 * 4 patches
    with pytest.raises(ValueError, match=r'\[6, 261\]'):
        models.Schedule([261] * 11 + [5], [261] * 11 + [5]).check(12, 256, 5)


def test_input_normalisation_follows_the_pretrained_weights():
    clip_mean = timm.models.get_pretrained_cfg('vit_base_patch16_clip_224.openai').mean
    assert models.input_normalization('sdt2net_vit_base_patch16_clip_224.openai')[0] == tuple(clip_mean)
    assert models.input_normalization('sdt2net_tiny_patch16_224')[0] == (0.485, 0.456, 0.406)


@pytest.mark.parametrize('name,size,target,full', [
    ('sdt2net_vit_small_patch14_reg4_dinov2', 56, 0.45, 21),  # 16 patches behind 5 prefix tokens
    ('sdt2net_vit_base_patch16_siglip_224', 64, 1.0, 16)])    # 16 patches, no prefix, attention pooling
def test_search_saves_its_schedule_under_the_models_name_and_evaluation_loads_it(tmp_path, capsys, name, size,
                                                                                 target, full):
    """Full-width DINOv2-S/14 with registers and SigLIP-B/16: a rate-only search moves the FLOPs
    toward the target, the schedule is keyed by the model's name, and --eval --load_compression_rate
    evaluates exactly it."""
    out = tmp_path / 'search'
    common = ['--data-set', 'synthetic', '--synthetic-classes', '3', '--synthetic-train-size', '32',
              '--synthetic-val-size', '6', '--model', name, '--input-size', str(size), '--batch-size', '4',
              '--num_workers', '0', '--granularity', '1', '--no-eab', '--throughput-batch', '0']
    assert entry.run(common + ['--search-mode', 'arch', '--epochs', '2', '--arch-lr', '0.1', '--arch-min-lr', '0.1',
                               '--flops-lambda', '50', '--target_flops', str(target), '--output_dir', str(out)]) == 0
    printed = capsys.readouterr().out
    start = float(re.search(r'now ([\d.]+) GFLOPs', printed).group(1))
    stored = json.load(open(out / 'compression_rate.json'))
    assert list(stored) == [name]
    schedule = load_schedule(str(out / 'compression_rate.json'), name, target)
    assert schedule.prune[0] == full and min(schedule.merge) < full
    assert entry.run(common + ['--eval', '--resume', str(out / 'checkpoint.pth'), '--load_compression_rate',
                               '--compression-rate-file', str(out / 'compression_rate.json'), '--target_flops',
                               str(target), '--output_dir', str(tmp_path / 'eval')]) == 0
    report = json.load(open(tmp_path / 'eval' / 'eval_metrics.json'))
    assert (report['prune_kept_num'], report['merge_kept_num']) == (list(schedule.prune), list(schedule.merge))
    assert report['gflops_fvcore'] == pytest.approx(report['gflops'], rel=1e-3)
    assert abs(report['gflops'] - target) < abs(start - target) / 2


def test_pretrained_weights_load_offline_from_a_file_as_in_timm(tmp_path, capsys):
    """timm's own offline route: pretrained=True with pretrained_cfg_overlay=dict(file=...), by
    name and through main.py's --pretrained --pretrained-file."""
    vit = timm_vit('dinov2_reg')
    path = tmp_path / 'dinov2_reg.pth'
    torch.save(vit.state_dict(), path)
    name, extra = FAMILIES['dinov2_reg']
    ours = timm.create_model(f'sdt2net_{name}', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                             **SMALL, **extra, eab=False, ftf=False)
    body = {k: v for k, v in vit.state_dict().items() if not k.startswith('head.')}  # DINOv2's cfg: no classifier
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in body.items())
    # checkpoint_path: an SDT2Net checkpoint of this architecture, loaded after building, as in timm
    torch.save({'state_dict': ours.state_dict()}, tmp_path / 'sdt2net.pth')
    again = timm.create_model(f'sdt2net_{name}', checkpoint_path=str(tmp_path / 'sdt2net.pth'), **SMALL, **extra,
                              eab=False, ftf=False)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in ours.state_dict().items())
    # main.py: --pretrained --pretrained-file (the full-width DINOv2-S/14 main.py builds)
    full = timm.create_model(name, img_size=56, num_classes=0)
    torch.save(full.state_dict(), tmp_path / 'full.pth')
    flags = ['--data-set', 'synthetic', '--model', f'sdt2net_{name}', '--pretrained', '--input-size', '56']
    args = entry.get_args_parser().parse_args(flags + ['--pretrained-file', str(tmp_path / 'full.pth')])
    model = create_model(args, num_classes=3)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in full.state_dict().items())
    # a file of another architecture: one error line that names the model and the way out
    code = entry.run(flags + ['--pretrained-file', str(path), '--epochs', '1'])
    err = capsys.readouterr().err
    assert code != 0 and len(err.strip().splitlines()) == 1 and f'sdt2net_{name}' in err and '--finetune' in err


@pytest.mark.skipif(not HAVE_ONNX, reason='optional packages of requirements-export.txt not installed')
@pytest.mark.parametrize('family,target', [('dinov2_reg', 0.35), ('augreg', 0.35), ('siglip', 1.5)])
def test_exported_graph_and_predict_agree_with_eager_on_every_image(family, target, tmp_path, capsys):
    """A run of the full-width model (EAB and FTF on, the geometric schedule), exported: onnxruntime
    and predict.py on the .onnx give eager's top-1 on every image."""
    name, extra = FAMILIES[family]
    size = extra['img_size']
    data, out = make_image_folder(tmp_path / 'data', val=3, size=size + 8), tmp_path / 'run'
    assert entry.run([str(a) for a in ['--data-path', data, '--model', f'sdt2net_{name}', '--input-size', size,
                                       '--fixed-schedule', 'geometric', '--target_flops', target, '--epochs', '1',
                                       '--batch-size', '4', '--num_workers', '0', '--warmup-epochs', '0',
                                       '--throughput-batch', '0', '--output_dir', out]]) == 0
    capsys.readouterr()
    path = tmp_path / 'model.onnx'
    assert export.main(['onnx', str(out / 'model_best.pth'), str(path), '--check', str(data / 'val'),
                        '--batch-size', '4', '--no-optimize']) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report['images'] == 9 and report['top1_agreement'] == 1.0 and report['images_over_tolerance'] == 0
    rows = {}
    for source in (out / 'model_best.pth', path):
        target = tmp_path / f'{source.suffix[1:]}.jsonl'
        assert predict.main([str(source), str(data / 'val'), '--out', str(target)]) == 0
        rows[source.suffix] = [json.loads(line)['classes'][0] for line in open(target)]
    assert rows['.onnx'] == rows['.pth'] and len(rows['.pth']) == 9
