"""engine.py: which parameters each search mode updates, metrics of a confusion matrix."""
import pytest
import torch

from conftest import small_sdt2net
from engine import Precision, SearchObjective, confusion_metrics, train_one_epoch


@pytest.mark.parametrize('mode,weights_move,rates_move', [
    ('alternate', True, True), ('joint', True, True), ('arch', False, True), ('weights', True, False)])
def test_search_modes_update_the_right_parameters(mode, weights_move, rates_move):
    model = small_sdt2net()
    if mode == 'weights':
        model.fix_schedule(model.schedule())
    optimizers = {}
    if mode != 'arch':
        optimizers['weights'] = torch.optim.SGD(model.weight_parameters(), lr=0.1)
    if mode != 'weights':
        optimizers['arch'] = torch.optim.SGD(model.arch_parameters(), lr=0.1)
    for p in model.weight_parameters():
        p.requires_grad_(mode != 'arch')
    for p in model.arch_parameters():
        p.requires_grad_(mode != 'weights')
    weights_before = model.head.weight.detach().clone()
    rates_before = model.rates.logits.detach().clone()
    loader = [(torch.randn(4, 3, 64, 64), torch.randint(0, 5, (4,))) for _ in range(4)]
    stats = train_one_epoch(model, criterion=torch.nn.CrossEntropyLoss(), loader=loader, num_steps=len(loader),
                            optimizers=optimizers, device=torch.device('cpu'), precision=Precision('cpu', None),
                            objective=SearchObjective(mode, target_flops=0.001, flops_lambda=5.0), epoch=0,
                            print_freq=100)
    assert torch.isfinite(torch.tensor(stats['loss']))
    assert (not torch.equal(model.head.weight, weights_before)) == weights_move
    assert (not torch.equal(model.rates.logits, rates_before)) == rates_move


def test_confusion_metrics_accuracy_and_kappa():
    confusion = torch.tensor([[8, 2], [1, 9]])
    metrics = confusion_metrics(confusion, top5_correct=20, loss_sum=4.0)
    assert metrics['acc1'] == pytest.approx(85.0) and metrics['overall_accuracy'] == metrics['acc1']
    # kappa = (p_o - p_e) / (1 - p_e) with p_e = (10*9 + 10*11) / 20^2 = 0.5
    assert metrics['kappa'] == pytest.approx((0.85 - 0.5) / 0.5)
    assert metrics['per_class_recall'] == pytest.approx([80.0, 90.0])
    assert metrics['per_class_precision'] == pytest.approx([800 / 9, 900 / 11])
    assert metrics['per_class_f1'] == pytest.approx([2 * 8 / (2 * 8 + 2 + 1) * 100, 2 * 9 / (2 * 9 + 1 + 2) * 100])
    assert metrics['loss'] == pytest.approx(0.2)
