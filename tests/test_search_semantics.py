"""What the search's gradients and DiffRate's merge rule compute (DiffRate's deit.py semantics)."""
import pytest
import torch

import models
from conftest import sharpen_attention, small_sdt2net
from engine import SearchObjective
from models.token_ops import merge_into

DEPTH, PATCHES = 4, 64  # small_sdt2net: stages prune(1), merge(1), ..., prune(3), merge(3)


def task_and_budget_gradients(model: models.SDT2Net):
    """(task-loss gradient, budget gradient) on the rate logits, [S, K] each, from one batch."""
    model.train()
    x = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    grads = []
    for loss_of in (lambda: model(x).logsumexp(-1).sum(), lambda: model.flops() / 1e9):
        model.rates.logits.grad = None
        loss_of().backward()
        grads.append(model.rates.logits.grad.clone())
    return grads


def stage_has_gradient(grad: torch.Tensor):
    return [bool(row.abs().sum() > 0) for row in grad]


def model_at(schedule: models.Schedule) -> models.SDT2Net:
    """FTF on: without it nothing after the last block's attention reads the patch tokens, so
    the last block's compression cannot change the logits (and gets no task gradient)."""
    model = small_sdt2net(eab=False, ftf=True, granularity=1).double()
    sharpen_attention(model)
    model.rates.start_at(schedule)
    assert model.schedule() == schedule.running_min()
    return model


def test_uniform_start_only_the_first_prune_stage_gets_the_task_gradient():
    """At DiffRate's uniform start every stage has the same count: block 1's prune removes the
    tokens and every later stage is held by it, so only that stage feels the task loss; all feel
    the budget."""
    model = small_sdt2net(eab=False, ftf=True).double()
    sharpen_attention(model)
    model.rates.reset('uniform')
    task, budget = task_and_budget_gradients(model)
    assert stage_has_gradient(task) == [True] + [False] * 5
    assert all(stage_has_gradient(budget))


def test_strictly_decreasing_schedule_every_stage_gets_the_task_gradient():
    schedule = models.Schedule([65, 60, 44, 28], [65, 52, 36, 20])
    task, budget = task_and_budget_gradients(model_at(schedule))
    assert all(stage_has_gradient(task)) and all(stage_has_gradient(budget))


def test_held_stage_gets_only_the_budget_gradient():
    """Block 2's prune keeps the 52 tokens block 1 passes on, and block 3's merge keeps what its
    prune left: both remove nothing, so the task loss does not reach them; the budget does."""
    schedule = models.Schedule([65, 60, 52, 28], [65, 52, 36, 28])
    task, budget = task_and_budget_gradients(model_at(schedule))
    assert stage_has_gradient(task) == [True, True, False, True, True, False]
    assert all(stage_has_gradient(budget))


def test_start_at_a_schedule_puts_every_stage_at_its_count():
    model = small_sdt2net(eab=False, ftf=False, granularity=4)
    dense = models.flops_range(model.shape(), 4)[1]
    schedule = models.uniform_schedule(model.shape(), 0.6 * dense, mode='merge', spacing='ratio')
    model.rates.start_at(schedule)
    for start, found in zip(schedule.stages(), model.rates.hard_stage_patches()):
        assert abs(start - found) <= 4  # the nearest candidate at granularity 4
    assert len(set(model.rates.hard_stage_patches())) > 2, 'not flat: each stage starts at its own count'


def test_diffrate_merge_rule_plain_mean_and_similarity_scaled_sizes():
    """DiffRate's merge: the plain mean of a destination and its sources; sizes add up with each
    source's size scaled by its similarity, every size clamped to 1 first in training only."""
    x = torch.randn(1, 6, 4)
    size = torch.tensor([1., 2., 1., 3., 1., 2.]).view(1, 6, 1)
    dst = torch.tensor([[1, 1]])  # tokens 3 and 4 fold into token 1
    similarity = torch.tensor([[0.5, 0.2]])
    merged, merged_size, _ = merge_into(x, size, dst, 3, 5, rule='diffrate', similarity=similarity)
    torch.testing.assert_close(merged[0, 1], (x[0, 1] + x[0, 3] + x[0, 4]) / 3)
    torch.testing.assert_close(merged[0, 2], x[0, 2])
    torch.testing.assert_close(merged_size[0, :, 0], torch.tensor([1., 2 + 3 * 0.5 + 1 * 0.2, 1.]))
    _, trained_size, _ = merge_into(x, size, dst, 3, 5, rule='diffrate', similarity=similarity, training=True)
    torch.testing.assert_close(trained_size[0, :, 0], torch.tensor([1., 2 + 1.5 + 1., 1.]))


def test_diffrate_merge_rule_in_the_model_differs_from_size_weighted():
    x = torch.randn(2, 3, 64, 64)
    outputs = []
    for rule in ('size-weighted', 'diffrate'):
        torch.manual_seed(0)
        model = small_sdt2net(eab=False, ftf=False, merge_rule=rule).eval()
        model.set_kept_num([65, 65, 65, 65], [65, 40, 25, 12])
        with torch.no_grad():
            outputs.append(model(x))
    assert outputs[0].isfinite().all() and outputs[1].isfinite().all()
    assert not torch.allclose(outputs[0], outputs[1])
    with pytest.raises(ValueError, match='merge_rule'):
        small_sdt2net(merge_rule='max')


def test_annealed_budget_slides_from_the_start_to_the_target():
    objective = SearchObjective('arch', target_flops=1.0, flops_lambda=5.0, start_flops=3.0, anneal_steps=10,
                                first_step=4)
    assert [objective.budget(step) for step in (0, 1, 6, 20)] == pytest.approx([2.2, 2.0, 1.0, 1.0])
    assert SearchObjective('arch', 1.0, 5.0).budget(0) == 1.0
