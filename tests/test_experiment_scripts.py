"""The experiment scripts compare what they name: experiments/importance.py the rankings (a random
ranking replaces the model's own), experiments/budget_fit.py a learned schedule brought onto a
budget against the hand-set rules at that budget."""
import json

import numpy as np
import torch

import main as entry
import models
from experiments import budget_fit, importance
from models.token_ops import TokenState
from test_pipeline import FAST, MODEL, make_image_folder
from workflow.runs import load_trained_model
from workflow.schedule_file import save_schedule


def test_compares_the_rankings_on_the_same_images(tmp_path, capsys):
    data, out = make_image_folder(tmp_path / 'data', val=3), tmp_path / 'run'
    assert entry.run([str(a) for a in ['--data-path', data, '--model', MODEL, '--fixed-schedule', 'dense',
                                       '--target_flops', '0.07', '--epochs', '1', '--output_dir', out, '--no-eab']
                      + FAST]) == 0
    report = tmp_path / 'importance.json'
    assert importance.main([str(out / 'checkpoint.pth'), '--data-path', str(data), '--target_flops', '0.05',
                            '--out', str(report)]) == 0
    results = json.loads(report.read_text())
    for mode in ('prune', 'merge'):
        assert set(results[mode]['top1']) == {'class', 'received', 'random'}
        assert results[mode]['class - random']['images'] == 9
    # the random hooks replace the ranking each block computes, and are removed afterwards
    model, _ = load_trained_model(str(out / 'checkpoint.pth'))
    x = torch.randn(2, model.patch_embed.num_patches + 1, model.embed_dim)
    state = TokenState(alive=x.shape[1], grid_size=tuple(model.patch_embed.grid_size))
    with torch.no_grad():
        own = model.blocks[1].attn(x, state, importance='class')[1]
        handles = importance.random_ranking(model, seed=0)
        noise = model.blocks[1].attn(x, state, importance='class')[1]
        for handle in handles:
            handle.remove()
        again = model.blocks[1].attn(x, state, importance='class')[1]
    assert not torch.allclose(own, noise) and torch.equal(own, again) and np.all(noise.numpy() < 1)


def test_budget_fit_compares_the_fitted_schedule_with_the_rules_at_its_budget(tmp_path):
    data, out = make_image_folder(tmp_path / 'data', val=3), tmp_path / 'run'
    assert entry.run([str(a) for a in ['--data-path', data, '--model', MODEL, '--fixed-schedule', 'dense',
                                       '--target_flops', '0.07', '--epochs', '1', '--output_dir', out, '--no-eab']
                      + FAST]) == 0
    learned = models.Schedule([10, 10, 10, 10, 9, 8, 7, 6, 5, 4, 3, 2], [10, 10, 10, 9, 8, 7, 6, 5, 4, 3, 2, 2])
    save_schedule(str(tmp_path / 'rates.json'), MODEL, 0.06, learned)
    report = tmp_path / 'fit.json'
    assert budget_fit.main([str(out / 'checkpoint.pth'), '--data-path', str(data), '--schedule',
                            f'{tmp_path / "rates.json"}:{MODEL}:0.06', '--target_flops', '0.05',
                            '--out', str(report)]) == 0
    results = json.loads(report.read_text())
    fitted = results['learned, brought onto the budget']
    assert 0.05 * (1 - models.BUDGET_TOLERANCE) <= fitted['gflops'] <= 0.05
    assert fitted['merge_kept_num'][:3] == [10, 10, 10]  # the leading blocks that kept every token still do
    assert {'geometric', 'backloaded 1'} <= set(results)
    assert results['differences']['geometric - learned, brought onto the budget']['images'] == 9
