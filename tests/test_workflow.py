"""DiffRate's protocol end to end on generated images: train a dense model, search rates on its
frozen weights, fine-tune under the found schedule, evaluate; each hand-over is checked."""
import json
import re

import torch

import main as entry
from workflow.schedule_file import load_schedule

MODEL = 'vit_deit_tiny_patch16_224'
COMMON = ['--model', MODEL, '--input-size', '48', '--granularity', '2', '--num_workers', '0', '--warmup-epochs', '0',
          '--batch-size', '4', '--print-freq', '50', '--throughput-batch', '0', '--data-set', 'synthetic',
          '--synthetic-classes', '3', '--synthetic-train-size', '32', '--synthetic-val-size', '6']
TARGET = '0.065'  # GFLOPs; dense DeiT-Tiny with EAB and FTF at 48 px is 0.088


def run(argv, capsys):
    code = entry.run([str(a) for a in argv])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def network_weights(path):
    state = torch.load(path, weights_only=True)
    return {k: v for k, v in state['model'].items() if not k.startswith('rates.')}, state


def test_train_search_finetune_evaluate(tmp_path, capsys):
    dense, search, tuned = tmp_path / 'dense', tmp_path / 'search', tmp_path / 'tuned'
    # (a) a model trained under a fixed (dense) schedule
    run(COMMON + ['--epochs', '1', '--fixed-schedule', 'dense', '--output_dir', dense], capsys)
    dense_weights, dense_state = network_weights(dense / 'checkpoint.pth')
    assert dense_state['schedule']['fixed']

    # (b) search its rates with the weights frozen: its fixed schedule does not come along
    # NOTE a small model at 48 px costs little per token, so the budget needs a larger lambda
    out = run(COMMON + ['--epochs', '2', '--finetune', dense / 'checkpoint.pth', '--search-mode', 'arch',
                        '--arch-lr', '0.1', '--arch-min-lr', '0.1', '--flops-lambda', '2000',
                        '--target_flops', TARGET, '--output_dir', search], capsys)
    assert 'schedule: learned (search from the uniform start)' in out
    search_weights, search_state = network_weights(search / 'checkpoint.pth')
    assert search_weights.keys() == dense_weights.keys()
    for key, value in dense_weights.items():
        assert torch.equal(value, search_weights[key]), f'{key} changed in a rate-only search'
    log = [json.loads(line) for line in open(search / 'log.txt')]
    start = json.loads(re.search(r'schedule: learned .* merge (\[[\d, ]+\])', out).group(1))
    assert not search_state['schedule']['fixed']
    assert search_state['schedule']['merge'] not in (start, [10] * 12), 'the search moved the schedule'
    gflops = log[-1]['train_gflops']
    assert abs(gflops - float(TARGET)) / float(TARGET) < 0.05, gflops
    found = load_schedule(str(search / 'compression_rate.json'), MODEL, float(TARGET))
    assert list(found.merge) == search_state['schedule']['merge']

    # (c) fine-tune the searched weights under the found schedule
    out = run(COMMON + ['--epochs', '1', '--finetune', search / 'checkpoint.pth', '--load_compression_rate',
                        '--compression-rate-file', search / 'compression_rate.json', '--target_flops', TARGET,
                        '--lr', '2e-5', '--min-lr', '1e-6', '--output_dir', tuned], capsys)
    assert 'weights training' in out
    tuned_weights, tuned_state = network_weights(tuned / 'checkpoint.pth')
    assert tuned_state['schedule'] == {'prune': list(found.prune), 'merge': list(found.merge), 'fixed': True}
    assert any(not torch.equal(tuned_weights[k], search_weights[k]) for k in search_weights)

    # (d) evaluate the fine-tuned checkpoint: its schedule comes with it
    out = run(COMMON + ['--eval', '--resume', tuned / 'checkpoint.pth', '--output_dir', tuned / 'eval'], capsys)
    report = json.load(open(tuned / 'eval' / 'eval_metrics.json'))
    assert (report['prune_kept_num'], report['merge_kept_num']) == (list(found.prune), list(found.merge))
    assert abs(report['gflops'] - gflops) < 1e-6 and report['schedule_origin'] == 'fixed by the resumed run'
    assert len(open(tuned / 'eval' / 'predictions.csv').read().splitlines()) == 1 + 6
