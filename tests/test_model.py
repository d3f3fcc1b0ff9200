"""Properties of the SDT2Net model (DESIGN.md section 9)."""
import json
import os

import pytest
import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import models
from conftest import REFERENCE_SCHEDULES, sharpen_attention, small_sdt2net
from models.token_ops import merge_into

NAMES = ['sdt2net_tiny_patch16_224', 'sdt2net_small_patch16_224', 'sdt2net_base_patch16_224',
         'vit_deit_tiny_patch16_224', 'vit_deit_small_patch16_224', 'vit_deit_base_patch16_224',
         'vit_deit_SDT2Net_small_patch16_224']

COMPRESSED = ([65, 60, 41, 30], [65, 52, 33, 20])  # prune, merge for small_sdt2net (64 patches)


@pytest.mark.parametrize('name', NAMES)
def test_registered_and_builds(name):
    assert timm.is_model(name)
    model = timm.create_model(name, num_classes=7, img_size=64, eab=False, ftf=True, granularity=2)
    assert isinstance(model, models.SDT2Net)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    prune, merge = model.get_kept_num()
    assert len(prune) == len(merge) == 12 and prune[0] == merge[0] == 17


@pytest.mark.parametrize('eab,ftf', [(False, False), (True, True)])
@pytest.mark.parametrize('train', [False, True])
def test_full_keep_equals_timm_deit(train, eab, ftf):
    """DeiT weights in SDT2Net at full keep compute DeiT's function; with EAB and FTF on too,
    because both start as the identity (zero last conv, zero second-order classifier)."""
    deit = timm.create_model('deit_tiny_patch16_224', num_classes=10, img_size=96)
    ours = timm.create_model('sdt2net_tiny_patch16_224', num_classes=10, img_size=96, eab=eab, ftf=ftf)
    missing, unexpected = ours.load_state_dict(models.adapt_state_dict(deit.state_dict(), ours), strict=False)
    assert not unexpected and all(k.startswith(('rates.', 'ftf.')) or '.eab.' in k for k in missing)
    ours.fix_schedule(models.Schedule.dense(12, 36))
    deit.train(train), ours.train(train)
    x = torch.randn(3, 3, 96, 96)
    torch.testing.assert_close(ours(x), deit(x), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize('eab,ftf', [(False, False), (True, True)])
def test_masked_training_forward_equals_evaluation_forward(eab, ftf, exact_masked_softmax):
    model = small_sdt2net(eab=eab, ftf=ftf).double()
    sharpen_attention(model)
    model.set_kept_num(*COMPRESSED)
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        evaluated = model(x)
    model.train()
    if model.ftf is not None:
        model.ftf.bn.eval()  # batch statistics are a training-only difference, not a compression one
    with torch.no_grad():
        masked = model(x)
    torch.testing.assert_close(masked, evaluated, atol=1e-9, rtol=1e-9)


def test_diffrates_eps_moves_the_masked_forward_by_under_a_millionth():
    model = small_sdt2net().double()
    sharpen_attention(model)
    model.set_kept_num(*COMPRESSED)
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        evaluated = model.eval()(x)
        model.train()
        model.ftf.bn.eval()  # batch statistics are a training-only difference, not a compression one
        masked = model(x)
    torch.testing.assert_close(masked, evaluated, atol=1e-6, rtol=1e-6)
    assert not torch.equal(masked, evaluated)


def test_learned_schedule_training_equals_evaluation(exact_masked_softmax):
    model = small_sdt2net(ftf=False).double()
    sharpen_attention(model)
    with torch.no_grad():
        model.rates.logits.normal_(0, 2)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    model.train()
    with torch.no_grad():
        masked = model(x)
    model.eval()
    with torch.no_grad():
        evaluated = model(x)
    torch.testing.assert_close(masked, evaluated, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize('schedule', [([65, 65, 65, 65], [65, 50, 31, 12]), COMPRESSED])
def test_sizes_and_patch_owners(schedule):
    model = small_sdt2net().eval()
    sharpen_attention(model)
    model.set_kept_num(*schedule)
    with torch.no_grad():
        tokens, state, owners = model.forward_tokens(torch.randn(3, 3, 64, 64), return_owners=True)
    size = state.size[..., 0]  # [B, N]
    owner = owners[-1]         # [B, P], N = pruned
    N = tokens.shape[1]
    assert N == schedule[1][-1]
    assert (owner <= N).all() and (owner >= 1).all(), 'no patch belongs to the class token'
    owned = torch.zeros(3, N + 1).scatter_add(1, owner, torch.ones_like(owner, dtype=torch.float))
    # every surviving patch token owns exactly the patches its size counts; cls stands for itself
    torch.testing.assert_close(owned[:, 1:N], size[:, 1:])
    assert (size[:, 0] == 1).all()
    pruned = owned[:, N]
    torch.testing.assert_close(size.sum(1) + pruned, torch.full((3,), 65.))
    if schedule[0] == [65] * 4:
        assert (pruned == 0).all() and (size.sum(1) == 65).all()


def test_merge_is_size_weighted_mean():
    x = torch.randn(2, 6, 4)
    size = torch.tensor([1., 2., 1., 3., 1., 2.]).view(1, 6, 1).expand(2, -1, -1)
    dst = torch.tensor([[1, 2], [2, 2]])  # tokens 3, 4 fold into these
    merged, merged_size, _ = merge_into(x, size, dst, kept=3, end=5)
    expected = (x[0, 1] * 2 + x[0, 3] * 3) / 5
    torch.testing.assert_close(merged[0, 1], expected)
    expected = (x[1, 2] * 1 + x[1, 3] * 3 + x[1, 4] * 1) / 5
    torch.testing.assert_close(merged[1, 2], expected)
    assert merged_size[0, :, 0].tolist() == [1, 5, 2] and merged_size[1, :, 0].tolist() == [1, 2, 5]


@pytest.mark.parametrize('train', [False, True])
def test_batch_invariance_all_components(train):
    model = small_sdt2net(drop_rate=0.0).double()
    sharpen_attention(model)
    model.set_kept_num(*COMPRESSED)
    model.train(train)
    if train:
        model.ftf.bn.eval()
    x = torch.randn(5, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i:i + 1]) for i in range(5)])
        reordered = model(x.flip(0)).flip(0)
    torch.testing.assert_close(together, alone, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(together, reordered, atol=1e-9, rtol=1e-9)


def test_rate_parameters_get_gradients_from_both_losses():
    model = small_sdt2net().train()
    torch.nn.init.normal_(model.ftf.fc.weight, std=0.1)  # it starts at zero; the last block's
    # compression reaches the loss only through the second-order head (the class token has left)
    # every stage removes tokens (at the uniform start only the first would: tests/test_search_semantics.py)
    model.rates.start_at(models.Schedule(*COMPRESSED))
    x = torch.randn(2, 3, 64, 64)
    model(x).logsumexp(-1).sum().backward()
    grad = model.rates.logits.grad
    assert grad is not None and (grad.abs().sum(-1) > 0).all(), 'classification loss reaches every stage'
    model.zero_grad()
    model.flops().backward()
    assert (model.rates.logits.grad.abs().sum(-1) > 0).all(), 'the FLOPs count reaches every stage'


def test_parameter_groups_partition_the_model():
    model = small_sdt2net()
    arch = {id(p) for p in model.arch_parameters()}
    weights = {id(p) for p in model.weight_parameters()}
    assert arch and not arch & weights
    assert arch | weights == {id(p) for p in model.parameters()}
    assert len(list(model.parameters())) == len(arch) + len(weights)


def test_rate_only_search_reaches_flops_target():
    model = small_sdt2net().train()
    for p in model.weight_parameters():
        p.requires_grad_(False)
    dense = models.Schedule.dense(4, 64).flops(model.shape())
    target = 0.5 * dense
    optimizer = torch.optim.Adam(model.arch_parameters(), lr=0.05)
    model.train()
    x, y = torch.randn(8, 3, 64, 64), torch.randint(0, 5, (8,))
    for _ in range(120):
        loss = torch.nn.functional.cross_entropy(model(x), y) + 5 * (model.flops() / 1e6 - target / 1e6) ** 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    achieved = float(model.eval().flops())
    assert abs(achieved - target) / target < 0.03, (achieved, target)
    model.schedule().check(4, 64)  # counts never increase with depth


@pytest.mark.parametrize('eab,ftf,eab_groups', [(False, False, 1), (True, True, 1), (True, True, 2)])
@pytest.mark.parametrize('fused', [True, False])
def test_analytic_flops_match_fvcore(eab, ftf, eab_groups, fused):
    model = small_sdt2net(eab=eab, ftf=ftf, eab_groups=eab_groups).eval()
    for block in model.blocks:
        block.attn.fused_attn = fused
    for schedule in ([[65] * 4] * 2, COMPRESSED):
        model.set_kept_num(*schedule)
        analytic, counted = float(model.flops()), models.fvcore_flops(model, 64)
        assert abs(analytic - counted) / counted < 1e-6, (schedule, analytic, counted)


def test_dense_deit_small_is_4_6_gflops():
    model = timm.create_model('sdt2net_small_patch16_224', eab=False, ftf=False).eval()
    model.set_kept_num([197] * 12, [197] * 12)
    assert round(float(model.flops()) / 1e9, 1) == 4.6


@pytest.mark.skipif(not os.path.exists(REFERENCE_SCHEDULES), reason='shared reference schedules not present')
def test_published_diffrate_schedules_give_reported_flops():
    with open(REFERENCE_SCHEDULES) as f:
        published = json.load(f)
    for key, name, tolerance in [('ViT-T-DeiT', 'tiny', 0.1), ('ViT-S-DeiT', 'small', 0.02), ('ViT-B-DeiT', 'base', 0.02)]:
        model = timm.create_model(f'sdt2net_{name}_patch16_224', eab=False, ftf=False).eval()
        for target, entry in published[key].items():
            model.set_kept_num(json.loads(entry['prune_kept_num']), json.loads(entry['merge_kept_num']))
            gflops = float(model.flops()) / 1e9
            assert abs(gflops - float(target)) / float(target) < tolerance, (key, target, gflops)


def test_set_kept_num_round_trip_and_validation():
    model = small_sdt2net()
    model.set_kept_num(*COMPRESSED)
    assert model.get_kept_num() == COMPRESSED
    with pytest.raises(ValueError, match='block 0'):
        model.set_kept_num([60, 60, 60, 60], [60, 60, 60, 60])
    with pytest.raises(ValueError, match='entries'):
        model.set_kept_num([65, 60], [65, 60])


def test_checkpoint_adapter_loads_deit_weights_at_another_size_and_class_count():
    deit = timm.create_model('deit_tiny_patch16_224', num_classes=1000)
    model = timm.create_model('sdt2net_tiny_patch16_224', num_classes=45, img_size=112)
    adapted = models.adapt_state_dict({'model': deit.state_dict()}, model)
    assert 'head.weight' not in adapted and adapted['pos_embed'].shape == model.pos_embed.shape
    missing, unexpected = model.load_state_dict(adapted, strict=False)
    assert not unexpected
    assert all(k.startswith(('rates.', 'ftf.', 'head.')) or '.eab.' in k for k in missing)
    torch.testing.assert_close(model.blocks[3].mlp.fc1.weight, deit.blocks[3].mlp.fc1.weight)


def test_checkpoint_adapter_rejects_another_architecture():
    small = timm.create_model('deit_small_patch16_224')
    model = timm.create_model('sdt2net_tiny_patch16_224')
    with pytest.raises(ValueError, match='does not fit'):
        models.adapt_state_dict(small.state_dict(), model)


def test_bfloat16_autocast_training_and_evaluation():
    model = small_sdt2net()
    x = torch.randn(2, 3, 64, 64)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        model.train()
        loss = model(x).float().logsumexp(-1).sum() + model.flops() / 1e6
        loss.backward()
        model.eval()
        with torch.no_grad():
            assert torch.isfinite(model(x).float()).all()
    assert torch.isfinite(model.rates.logits.grad).all() and model.rates.logits.grad.abs().sum() > 0


@pytest.mark.parametrize('spacing', ['count', 'ratio'])
@pytest.mark.parametrize('mode', ['merge', 'prune'])
def test_uniform_schedules_remove_evenly_and_meet_the_target(mode, spacing):
    model = timm.create_model('sdt2net_tiny_patch16_224', img_size=112, num_classes=45)
    schedule = models.uniform_schedule(model.shape(), 0.35, mode, spacing)
    removed = schedule.merged_tokens() if mode == 'merge' else schedule.pruned_tokens()
    other = schedule.pruned_tokens() if mode == 'merge' else schedule.merged_tokens()
    assert not any(other), f'a uniform {mode} schedule removes tokens only by {mode}'
    if spacing == 'count':
        assert max(removed[1:]) - min(removed[1:]) <= 1, 'the same number removed in every block'
    else:
        before = [schedule.prune[0]] + list(schedule.merge[:-1])
        fractions = [(r + 0.5) / (n - 1) for r, n in zip(removed[1:], before[1:])]  # of the patches present
        assert max(fractions) - min(fractions) < 0.1, fractions
    model.fix_schedule(schedule)
    assert abs(float(model.flops().detach()) / 1e9 - 0.35) / 0.35 < 0.02
    assert model.schedule() == schedule


def test_backloaded_schedule_keeps_every_token_then_merges_the_same_fraction():
    """DeiT-Tiny at 112 px (49 patches), 2 dense blocks at 0.145 GFLOPs: blocks 0-2 keep all 50
    tokens, blocks 3-11 merge the same fraction of the patches present (about 27%), the FLOPs meet
    the budget; without dense blocks it is the geometric schedule."""
    shape = timm.create_model('sdt2net_tiny_patch16_224', img_size=112, num_classes=45, eab=False, ftf=False).shape()
    schedule = models.uniform_schedule(shape, 0.145, 'merge', 'ratio', dense_blocks=2)
    assert schedule.merge[:3] == (50,) * 3 and schedule.prune[:4] == (50,) * 4 and not any(schedule.pruned_tokens())
    assert schedule.merge == (50, 50, 50, 37, 27, 20, 15, 11, 8, 6, 5, 4)
    assert abs(schedule.flops(shape) / 1e9 - 0.145) / 0.145 < 0.01
    assert models.uniform_schedule(shape, 0.145, 'merge', 'ratio', 0) == \
        models.uniform_schedule(shape, 0.145, 'merge', 'ratio')
    with pytest.raises(ValueError, match='after 10 dense blocks'):
        models.uniform_schedule(shape, 0.1, 'merge', 'ratio', dense_blocks=10)
    with pytest.raises(ValueError, match='dense_blocks'):
        models.uniform_schedule(shape, 0.2, 'merge', 'ratio', dense_blocks=11)


# the pretrained backbone's learned schedule (compression_rate.json, sdt2net_tiny_patch16_224 at 0.176)
LEARNED = models.Schedule([50, 50, 49, 48, 46, 43, 27, 25, 17, 11, 11, 11], [50, 49, 48, 46, 43, 27, 26, 20, 11, 11, 11, 11])


@pytest.mark.parametrize('target', [0.23, 0.185, 0.145, 0.115])
def test_a_learned_schedule_is_brought_onto_its_budget_keeping_its_shape(target):
    """At or below the budget and within 2%; blocks that kept every patch still do, every block
    keeps no more than before when the budget is lower, the order of the blocks' counts is kept."""
    shape = timm.create_model('sdt2net_tiny_patch16_224', img_size=112, num_classes=45, eab=False, ftf=False).shape()
    fitted = models.onto_budget(LEARNED, shape, target)
    gflops = fitted.flops(shape) / 1e9
    assert (1 - models.BUDGET_TOLERANCE) * target <= gflops <= target, gflops
    fitted.check(12, 49, 1)
    assert fitted.merge[0] == 50
    lower = LEARNED.flops(shape) / 1e9 > target
    for before, after in zip(LEARNED.merge, fitted.merge):
        assert (after <= before + 1) if lower else (after >= before)
    ranks = sorted(range(12), key=lambda i: -LEARNED.merge[i])
    assert all(fitted.merge[ranks[i]] >= fitted.merge[ranks[i + 1]] for i in range(11))
    assert models.onto_budget(fitted, shape, target) == fitted  # already on the budget: unchanged


def test_a_schedule_that_no_power_brings_onto_the_budget_is_refused():
    shape = timm.create_model('sdt2net_tiny_patch16_224', img_size=112, num_classes=45, eab=False, ftf=False).shape()
    dense = models.Schedule.dense(12, 49, 1)
    with pytest.raises(ValueError, match='below'):
        models.onto_budget(dense, shape, 0.2)


class HostDeviceSyncs(TorchDispatchMode):
    """Records operators that would stall a GPU: host reads of tensor values (item, int, bool),
    nonzero and boolean-mask indexing (their output size lives on the device), and tensors
    built from host data (a blocking host-to-device copy). Python scalars lifted to 0-d tensors
    are not counted: `x[i] = 0.0` lifts one, and CUDA kernels take those by value."""

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        boolean_index = name == 'index' and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ()))
        host_data = name == 'lift_fresh' and args[0].dim() > 0
        if name in ('_local_scalar_dense', 'nonzero', 'masked_select') or boolean_index or host_data:
            self.found.append(name)
        return func(*args, **(kwargs or {}))


def test_fine_tuning_step_does_not_synchronise_host_and_device():
    model = small_sdt2net().train()
    model.set_kept_num(*COMPRESSED)
    x = torch.randn(2, 3, 64, 64)
    model(x)  # reads the fixed schedule once; it is cached from then on
    with HostDeviceSyncs() as syncs:
        loss = model(x).logsumexp(-1).sum() + model.flops() / 1e9
        loss.backward()
    assert syncs.found == []


@pytest.mark.parametrize('fixed', [True, False])
def test_every_tensor_is_made_on_the_model_device(monkeypatch, fixed):
    """Forward, FLOPs, backward and evaluation on the `meta` device, which refuses to mix with CPU
    tensors: a tensor made on a fixed device (torch.zeros(n) without device=) would fail the same
    way on a GPU. Meta tensors hold no values, so the kept counts come from a CPU copy of the
    rates, and autocast (which knows no meta device) is told it runs on CPU."""
    model = small_sdt2net().train()
    if fixed:
        model.set_kept_num(*COMPRESSED)
    with torch.no_grad():
        model.rates.logits.normal_()  # a learned schedule that compresses
    host_rates = model.rates.hard_stage_patches()
    model = model.to('meta')
    device_counts = torch.tensor(host_rates, dtype=torch.float32, device='meta')
    monkeypatch.setattr(type(model.rates), '_hard_counts', lambda self: (device_counts, host_rates))
    cpu_autocast = torch.autocast
    monkeypatch.setattr(torch, 'autocast', lambda device_type, **kw: cpu_autocast(
        'cpu' if device_type == 'meta' else device_type, **kw))
    x = torch.randn(2, 3, 64, 64, device='meta')
    loss = model(x).logsumexp(-1).sum() + model.flops() / 1e9
    loss.backward()
    assert model.rates.logits.grad.device.type == 'meta'
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 5)


def test_prune_distribution_receives_the_gradient_of_the_tokens_it_prunes():
    """A stage's straight-through mask reads 1 where another stage removed the token, so in
    mask = previous * prune * merge every removed token's gradient reaches the stage that
    removed it: pruned tokens the prune distribution, merged tokens the merge distribution."""
    from models.compression_rates import CompressionRates
    rates = CompressionRates(depth=2, num_patches=16, granularity=1)
    with torch.no_grad():  # candidates 16..1: prune keeps 12 patches, merge keeps 8
        rates.logits.fill_(-30)
        rates.logits[0, 16 - 12] = 30
        rates.logits[1, 16 - 8] = 30
    assert rates.hard_stage_patches() == [12, 8]
    prune_mask, merge_mask = rates.token_masks()
    assert prune_mask.tolist() == [1.0] * 13 + [0.0] * 4
    assert merge_mask.tolist() == [1.0] * 9 + [0.0] * 4 + [1.0] * 4
    mask = prune_mask * merge_mask
    assert mask.tolist() == [1.0] * 9 + [0.0] * 8
    with torch.no_grad():
        rates.logits.zero_()  # soft probabilities that are not saturated, same hard counts below
    rates.logits.grad = None
    prune_mask, merge_mask = rates.token_masks()
    (prune_mask * merge_mask)[15].backward()  # position 15 is pruned
    assert rates.logits.grad[0].abs().sum() > 0 and rates.logits.grad[1].abs().sum() == 0


def test_budget_gradient_reaches_both_counts_of_a_block():
    """FLOPs after a block depend on the tokens leaving it, min(prune, merge); as DiffRate's
    ste_min, that count's gradient goes to both counts, and a stage held by an earlier stage's
    smaller count (running minimum) still gets its own."""
    model = small_sdt2net()
    with torch.no_grad():
        model.rates.logits.normal_(0, 1)
    counts = model.rates.stage_patches()  # [S], prune(1), merge(1), ...
    counts.retain_grad()
    models.analytic_flops(model.shape(), counts[0::2] + 1, counts[1::2] + 1).backward()
    one_token_mlp = 2 * model.embed_dim * model.blocks[0].mlp.fc1.out_features
    assert (counts.grad > 0).all() and (counts.grad[0::2] >= one_token_mlp).all(), counts.grad


def test_eab_on_tokens_equals_the_grid_module_at_full_keep():
    """At full keep the tokens are the patch grid: the SCM equals ELAN's module on the grid
    (shift, 1x1 conv2d, ReLU, shift, 1x1 conv2d, residual), written out here with conv2d."""
    from models.eab import EfficientAttentionShift
    torch.manual_seed(0)
    eab = EfficientAttentionShift(40, 2.0, 1, shift=2, shared=True).double()
    torch.nn.init.normal_(eab.scm.reduce.weight, std=0.1)
    q, k = torch.randn(2, 2, 65, 40, dtype=torch.float64).unbind(0)
    state = models.sdt2net.TokenState(alive=65, grid_size=(8, 8))
    q_out, k_out = eab(q, k, state)

    def grid_shift(x, s=2):  # [B, C, H, W], five channel slices: left, right, up, down, identity
        g, out = x.shape[1] // 5, torch.zeros_like(x)
        out[:, :g, :, :-s], out[:, g:2 * g, :, s:] = x[:, :g, :, s:], x[:, g:2 * g, :, :-s]
        out[:, 2 * g:3 * g, :-s], out[:, 3 * g:4 * g, s:] = x[:, 2 * g:3 * g, s:], x[:, 3 * g:4 * g, :-s]
        out[:, 4 * g:] = x[:, 4 * g:]
        return out

    def reference(t):
        grid = t[:, 1:].transpose(1, 2).reshape(2, 40, 8, 8)
        scm = eab.scm
        y = torch.nn.functional.conv2d(grid_shift(grid), scm.expand.weight[..., None], scm.expand.bias).relu()
        y = torch.nn.functional.conv2d(grid_shift(y), scm.reduce.weight[..., None], scm.reduce.bias)
        return torch.cat([t[:, :1], t[:, 1:] + y.flatten(2).transpose(1, 2)], dim=1)

    torch.testing.assert_close(q_out, reference(q), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(k_out, reference(k), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize('compressed', [False, True])
def test_eab_stacked_q_and_k_equal_one_after_the_other(monkeypatch, compressed):
    """Small batches pass q and k through the shared SCM as one batch of 2B, the residual added
    in place; large ones pass them one after the other. Same outputs and gradients."""
    import models.eab as eab_module
    torch.manual_seed(0)
    eab = eab_module.EfficientAttentionShift(40, 2.0, 1, shift=1, shared=True).double()
    torch.nn.init.normal_(eab.scm.reduce.weight, std=0.1)
    B, N = 3, 20  # N tokens with the class token, on an 8 x 8 grid
    owner = None
    if compressed:
        owner = torch.randint(1, N + 1, (B, 64))  # N: pruned
        owner[:, :N - 1] = torch.arange(1, N)
    state = models.sdt2net.TokenState(alive=N if compressed else 65, grid_size=(8, 8), owner=owner)
    q0, k0 = torch.randn(2, B, N if compressed else 65, 40, dtype=torch.float64).unbind(0)
    results = []
    for limit in (1 << 40, 0):
        monkeypatch.setattr(eab_module, 'STACK_BYTES', limit)
        q, k = q0.clone().requires_grad_(), k0.clone().requires_grad_()
        eab.zero_grad()
        q_out, k_out = eab(q, k, state)
        (q_out.sin().sum() + k_out.cos().sum()).backward()
        results.append((q_out, k_out, q.grad, k.grad, eab.scm.expand.weight.grad.clone()))
    for stacked, sequential in zip(*results):
        torch.testing.assert_close(stacked, sequential, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(results[0][0][:, 0], q0[:, 0])  # class token untouched


def test_eab_shift_lists_are_built_once_per_compression(monkeypatch):
    """Blocks that do not compress reuse the shift lists of the block before (same owners); a
    compression hands the next block an empty store, so nothing stale is reused."""
    import models.eab as eab_module
    built = []
    original = eab_module.GridShift.__init__

    def counting(self, grid_size, owner, *args, **kwargs):
        built.append(owner is not None)
        original(self, grid_size, owner, *args, **kwargs)
    monkeypatch.setattr(eab_module.GridShift, '__init__', counting)
    model = small_sdt2net().eval()
    model.set_kept_num([65, 40, 40, 40], [65, 30, 30, 30])  # only block 1 compresses
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model(x)
    # blocks 0-1 (their attention precedes block 1's compression): the identity layout, once; block 2
    # builds from the new owners; block 3 reuses them
    assert built == [False, True], built
    tokens = torch.randn(2, 65, 40)
    state = models.sdt2net.TokenState(alive=65, grid_size=(8, 8), track_owner=True)
    state.derived['anything'] = object()
    _, compressed = models.token_ops.compress(tokens, state, torch.rand(2, 64), 40, 30)
    assert compressed.derived == {} and state.derived


def test_eab_cost_follows_the_kept_tokens_and_its_structure_options():
    shape = timm.create_model('sdt2net_small_patch16_224', num_classes=45).shape()
    no_eab = timm.create_model('sdt2net_small_patch16_224', num_classes=45, eab=False).shape()
    half = models.Schedule((197,) + (99,) * 11, (197,) + (99,) * 11)
    dense = models.Schedule.dense(12, 196)
    eab_dense = dense.flops(shape) - dense.flops(no_eab)
    eab_half = half.flops(shape) - half.flops(no_eab)
    assert eab_dense == 4 * 196 * 384 * 768 * 12  # two 1x1 convs for q and for k, every patch
    # patch tokens present in each block: compression follows attention, so block 1 sees all
    assert eab_half == 4 * 384 * 768 * (196 * 2 + 98 * 10)
    counts = {}
    for shared in (True, False):
        model = timm.create_model('sdt2net_small_patch16_224', num_classes=45, eab_shared=shared)
        counts[shared] = sum(p.numel() for p in model.weight_parameters())
    assert abs(counts[True] / 1e6 - 28.8) < 0.1, counts  # official DeiT-S + shared EAB (+ FTF)
    assert counts[False] - counts[True] == 12 * (2 * 384 * 768 + 768 + 384)


@pytest.mark.parametrize('channels,groups,shift', [(40, 1, 2), (384, 1, 2), (768, 1, 1), (36, 6, 1)])
@pytest.mark.parametrize('exported', [False, True])
def test_token_shift_equals_paint_shift_and_read_back(channels, groups, shift, exported):
    """The EAB's shift of compressed tokens (a weighted sum of token rows per channel slice; in
    exported graphs N x N matrices) equals the plain procedure: paint every token onto its
    patches (pruned: zero), shift the grid, average each token's patches. A token that owns no
    patch (masked in training) receives zeros in the moving slices."""
    from models.eab import GridShift, shift_channel_groups
    B, H, W, N = 3, 7, 7, 20
    owner = torch.randint(0, N + 1, (B, H * W))  # N: pruned
    owner[:, :N - 1] = torch.arange(N - 1)  # every token but the last owns a patch
    owner[owner == N - 1] = N
    x = torch.randn(B, N, channels, dtype=torch.float64)
    if exported:  # the exported graphs' form: channels first, [B, C, 1, N]
        with models.export_numerics():
            grid_shift = GridShift((H, W), owner, N, shift, groups, torch.float64)
        tokens = x.transpose(1, 2).reshape(B, groups, channels // groups, 1, N)
        moving = 4 * (channels // groups // 5)
        shifted = grid_shift.channels_first(tokens[:, :, :moving], tokens[:, :, moving:]).view(B, channels, N)
        shifted = shifted.transpose(1, 2)
    else:
        shifted = GridShift((H, W), owner, N, shift, groups, torch.float64)(x)
    moving = torch.ones(channels, dtype=torch.bool).view(groups, -1)
    moving[:, 4 * (channels // groups // 5):] = False
    torch.testing.assert_close(shifted[:, -1, moving.flatten()], x.new_zeros(B, int(moving.sum())))
    padded = torch.cat([x, x.new_zeros(B, 1, channels)], 1)
    index = owner[..., None].expand(-1, -1, channels)
    painted = padded.gather(1, index).view(B, H, W, channels)
    moved = shift_channel_groups(painted, groups, shift).view(B, H * W, channels)
    summed = padded.new_zeros(B, N + 1, channels).scatter_add(1, index, moved)
    count = padded.new_zeros(B, N + 1, 1).scatter_add(1, owner[..., None], padded.new_ones(B, H * W, 1))
    torch.testing.assert_close(shifted[:, :N - 1], (summed / count.clamp(min=1))[:, :N - 1], atol=1e-12, rtol=1e-12)


def test_masked_softmax_is_diffrates_and_stays_finite_where_every_kept_weight_underflows():
    """DiffRate's softmax_with_policy, written out here: (exp(l - max) m + eps / N) / (sum + eps).
    A row whose largest logits sit on masked keys (every kept weight underflows to 0) is uniform
    and its gradient finite; the reciprocal of the clamped sum of the kept softmax gave NaN there."""
    from models.sdt2net import masked_softmax
    logits = torch.tensor([[0.5, -1.0, 2.0, 0.0], [0.0, -200.0, 200.0, -150.0]], dtype=torch.float64, requires_grad=True)
    keep = torch.tensor([[1.0, 1.0, 0.0, 1.0], [1.0, 1.0, 0.0, 1.0]], dtype=torch.float64)
    e = (logits - logits.max(dim=-1, keepdim=True)[0]).exp() * keep
    expected = (e + 1e-6 / 4) / (e.sum(-1, keepdim=True) + 1e-6)
    attn = masked_softmax(logits, keep)
    assert torch.allclose(attn, expected.float().to(attn.dtype), atol=1e-7)
    assert torch.allclose(attn[1], torch.full((4,), 0.25, dtype=attn.dtype), atol=1e-6)  # the underflowing row
    upstream = torch.tensor([0.0, 100.0, 200.0, 300.0])  # a loss's gradient w.r.t. the attention row
    (attn * upstream.to(attn.dtype)).sum().backward()
    assert torch.isfinite(logits.grad).all()
    clamped = logits.detach().requires_grad_()
    weights = clamped.float().softmax(-1) * keep.float()
    replaced = weights * weights.sum(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny).reciprocal()
    (replaced * upstream).sum().backward()
    assert not torch.isfinite(clamped.grad).all()  # the form it replaces
