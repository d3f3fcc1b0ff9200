"""The experiment scripts compare what they name: experiments/importance.py the rankings (a random
ranking replaces the model's own), experiments/budget_fit.py learned schedules against the hand-set rules at their budget (the
back-loaded member chosen on one split is the one scored on the other, and the flags it hands on run
the schedule it scored), experiments/budget_study_report.py their tables."""
import json

import numpy as np
import torch

import main as entry
import models
from experiments import budget_fit, budget_study_report, importance
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


def test_budget_fit_compares_the_learned_schedules_with_the_rules_at_their_budget(tmp_path, capsys):
    data, out, study = make_image_folder(tmp_path / 'data', val=3), tmp_path / 'run', tmp_path / 'study'
    assert entry.run([str(a) for a in ['--data-path', data, '--model', MODEL, '--fixed-schedule', 'dense',
                                       '--target_flops', '0.07', '--epochs', '1', '--output_dir', out, '--no-eab']
                      + FAST]) == 0
    checkpoint = str(out / 'checkpoint.pth')
    # a schedule filed at another budget is brought onto this one; one filed at it runs as filed
    elsewhere = models.Schedule([10, 10, 10, 10, 9, 8, 7, 6, 5, 4, 3, 2], [10, 10, 10, 9, 8, 7, 6, 5, 4, 3, 2, 2])
    save_schedule(str(tmp_path / 'rates.json'), MODEL, 0.06, elsewhere)
    model, _ = load_trained_model(checkpoint)
    filed = models.uniform_schedule(model.shape(), 0.05, 'merge', 'ratio', dense_blocks=3)
    (study / 'search_0.05_s0').mkdir(parents=True)
    save_schedule(str(study / 'search_0.05_s0' / 'compression_rate.json'), MODEL, 0.05, filed, target_flops=0.05,
                  gflops=filed.flops(model.shape()) / 1e9)
    learned = ['--learned', f'elsewhere={tmp_path / "rates.json"}:{MODEL}:0.06',
               '--learned', f'seed 0={study / "search_0.05_s0" / "compression_rate.json"}:{MODEL}:0.05']
    common = [checkpoint, '--data-path', str(data), '--target_flops', '0.05'] + learned
    assert budget_fit.main(common + ['--out', str(study / 'eval_0.05_val.json')]) == 0
    val = json.loads((study / 'eval_0.05_val.json').read_text())
    fitted = val['schedules']['elsewhere']
    assert 0.05 * (1 - models.BUDGET_TOLERANCE) <= fitted['gflops'] <= 0.05
    assert fitted['merge_kept_num'][:3] == [10, 10, 10]  # the leading blocks that kept every token still do
    assert fitted['flags'] is None and val['schedules']['seed 0']['merge_kept_num'] == list(filed.merge)
    members = [label for label in val['schedules'] if label.startswith('backloaded ')]
    assert {'geometric', 'backloaded 1'} <= set(val['schedules']) and len(members) > 1
    assert val['differences']['seed 0 - geometric']['images'] == 9
    assert val['chosen']['learned']['label'] == 'seed 0'  # the only one that runs as filed
    # "test" (here the same images): only the back-loaded member val chose
    assert budget_fit.main(common + ['--choose-on', str(study / 'eval_0.05_val.json'),
                                     '--out', str(study / 'eval_0.05_test.json')]) == 0
    test = json.loads((study / 'eval_0.05_test.json').read_text())
    best = max(members, key=lambda label: val['schedules'][label]['top1'])
    assert [label for label in test['schedules'] if label.startswith('backloaded ')] == [best]
    # the flags of the choices run in main.py exactly the schedules that were scored
    for kind in ('learned', 'rule'):
        chosen = val['chosen'][kind]
        assert entry.run([str(a) for a in ['--eval', '--data-path', data, '--model', MODEL, '--no-eab',
                                           '--finetune', checkpoint, '--target_flops', '0.05',
                                           '--output_dir', tmp_path / f'eval_{kind}'] + chosen['flags'] + FAST]) == 0
        metrics = json.loads((tmp_path / f'eval_{kind}' / 'eval_metrics.json').read_text())
        assert metrics['merge_kept_num'] == val['schedules'][chosen['label']]['merge_kept_num']
        assert abs(metrics['acc1'] - val['schedules'][chosen['label']]['top1']) < 1e-6
    # --as-learned: the counts the search learned, filed beside its schedule, at their own FLOPs
    searched = models.uniform_schedule(model.shape(), 0.053, 'merge', 'ratio')
    save_schedule(str(study / 'search_0.05_s0' / 'compression_rate.json'), MODEL, 0.05, filed, target_flops=0.05,
                  gflops=filed.flops(model.shape()) / 1e9,
                  learned={**searched.as_dict(), 'gflops': searched.flops(model.shape()) / 1e9})
    reached = searched.flops(model.shape()) / 1e9
    assert budget_fit.main([checkpoint, '--data-path', str(data), '--target_flops', str(reached + 1e-4), '--as-learned',
                            '--learned', learned[3], '--choose-on', str(study / 'eval_0.05_val.json'),
                            '--out', str(study / 'eval_0.05_s0_as_learned_test.json')]) == 0
    stopped = json.loads((study / 'eval_0.05_s0_as_learned_test.json').read_text())['schedules']['seed 0']
    assert stopped['merge_kept_num'] == list(searched.merge) and stopped['flags'] is None
    capsys.readouterr()
    assert budget_study_report.main([str(study)]) == 0
    report = capsys.readouterr().out
    assert f'| study | 0.05 | seed 0 | {val["schedules"]["seed 0"]["gflops"]:.4f} |' in report
    assert f'{best}: ' in report and 'mean over search seeds' in report
    assert f'| study | 0.05 | seed 0 | {reached:.4f} |' in report  # the as-learned row


def test_budget_fit_refuses_a_malformed_learned_schedule(tmp_path, capsys):
    assert budget_fit.main(['no.pth', '--data-path', str(tmp_path), '--learned', 'rates.json', '--target_flops',
                            '0.05']) == 2
    assert 'expected [LABEL=]FILE:MODEL:GFLOPS' in capsys.readouterr().err
