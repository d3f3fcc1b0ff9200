"""Bad input to every entry point: exactly one `error:` line, a non-zero exit, no traceback, and
the files of a finished run untouched (byte-identical); a run killed while writing a checkpoint
resumes from the last complete one; a run that turns non-finite stops at its step; the error
boundary reports any exception in one line."""
import hashlib
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import benchmark
import compare
import export
import main as entry
import make_splits
import predict
import results
import visualize
from conftest import ROOT
from test_pipeline import FAST, MODEL, TARGET, make_image_folder
from utils import UserError, error_boundary

COMMON = ['--model', MODEL, '--target_flops', TARGET] + FAST


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
    """(data folder, run folder, scratch folder) after a one-epoch search on an image folder."""
    root = tmp_path_factory.mktemp('errors')
    data, out = make_image_folder(root / 'data'), root / 'out'
    assert entry.run([str(a) for a in ['--data-path', data, '--output_dir', out, '--epochs', '1'] + COMMON]) == 0
    make_image_folder(root / 'other', classes=('forest', 'harbor', 'beach'))
    (root / 'a_file').write_text('not a folder')
    (root / 'junk.pth').write_bytes(os.urandom(256))
    write_schedule(root / 'increasing.json', [50, 20, 30] + [20] * 9, [50, 20, 30] + [20] * 9)
    write_schedule(root / 'merge_above_prune.json', [50] + [20] * 11, [50] + [25] * 11)
    return data, out, root


def write_schedule(path, prune, merge):
    path.write_text(json.dumps({MODEL: {TARGET: {'prune_kept_num': prune, 'merge_kept_num': merge}}}))


def snapshot(folder):
    """sha256 of every file under folder, by relative path."""
    return {os.path.relpath(os.path.join(d, f), folder): hashlib.sha256(open(os.path.join(d, f), 'rb').read()).hexdigest()
            for d, _, files in os.walk(folder) for f in files}


def assert_one_error_line(code, out, err, words):
    assert code not in (0, None), 'bad input must end with a non-zero exit'
    assert 'Traceback' not in out + err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith('error:')]
    assert len(errors) == 1, err
    for word in words:
        assert word in errors[0], errors[0]


# (name, arguments of main.py with {data}, {out}, {root} filled in, words the error line must hold)
MAIN_CASES = [
    ('same command again', ['--data-path', '{data}', '--output_dir', '{out}', '--epochs', '1'],
     ['already holds a run', '--autoresume']),
    ('evaluation into the run folder', ['--data-path', '{data}', '--eval', '--resume', '{out}/checkpoint.pth',
                                        '--output_dir', '{out}'], ['already holds a run']),
    ('resume at another input size', ['--data-path', '{data}', '--resume', '{out}/checkpoint.pth', '--eval',
                                      '--input-size', '64'], ['input-size', '64', '48']),
    ('resume with another granularity', ['--data-path', '{data}', '--resume', '{out}/checkpoint.pth', '--eval',
                                         '--granularity', '4'], ['granularity']),
    ('resume with other EAB groups', ['--data-path', '{data}', '--resume', '{out}/checkpoint.pth', '--eval',
                                      '--eab-groups', '3'], ['eab-groups']),
    ('resume without EAB', ['--data-path', '{data}', '--resume', '{out}/checkpoint.pth', '--eval', '--no-eab'],
     ['has the EAB', 'remove --no-eab']),
    ('resume of random bytes', ['--data-path', '{data}', '--resume', '{root}/junk.pth', '--eval'], ['junk.pth']),
    ('resume of a missing file', ['--data-path', '{data}', '--resume', '{root}/none.pth', '--eval'], ['none.pth']),
    ('finetune from random bytes', ['--data-path', '{data}', '--finetune', '{root}/junk.pth', '--epochs', '1',
                                    '--output_dir', '{root}/new1'], ['junk.pth']),
    ('zero epochs', ['--data-path', '{data}', '--epochs', '0', '--output_dir', '{root}/new2'], ['--epochs']),
    ('zero granularity', ['--data-path', '{data}', '--granularity', '0', '--output_dir', '{root}/new3'],
     ['--granularity']),
    ('tiny input size', ['--data-path', '{data}', '--input-size', '8', '--output_dir', '{root}/new4'],
     ['--input-size']),
    ('negative learning rate', ['--data-path', '{data}', '--lr', '-1', '--output_dir', '{root}/new5'], ['--lr']),
    ('negative flops lambda', ['--data-path', '{data}', '--flops-lambda', '-1', '--output_dir', '{root}/new6'],
     ['lambda']),
    ('unreachable target in arch search', ['--data-path', '{data}', '--search-mode', 'arch', '--target_flops',
                                           '0.001', '--output_dir', '{root}/new7'], ['target_flops']),
    ('unreachable fixed uniform schedule', ['--data-path', '{data}', '--fixed-schedule', 'uniform', '--target_flops',
                                            '0.001', '--output_dir', '{root}/new8'], ['0.001']),
    ('output folder is a file', ['--data-path', '{data}', '--output_dir', '{root}/a_file'], ['a_file']),
    ('output folder under a file', ['--data-path', '{data}', '--output_dir', '{root}/a_file/run'], ['a_file']),
    ('missing data folder', ['--data-path', '{root}/nowhere', '--output_dir', '{root}/new9'], ['nowhere']),
    ('missing training folder', ['--data-path', '{data}', '--train-path', '{root}/nowhere', '--output_dir',
                                 '{root}/new10'], ['nowhere']),
    ('training folder of other classes', ['--data-path', '{data}', '--train-path', '{root}/other/train',
                                          '--output_dir', '{root}/new11'], ['only in train', 'beach']),
    ('missing evaluation split', ['--data-path', '{data}', '--eval', '--resume', '{out}/checkpoint.pth',
                                  '--eval-split', 'test'], ['test']),
    ('schedule file with increasing counts', ['--data-path', '{data}', '--eval', '--resume', '{out}/checkpoint.pth',
                                              '--load_compression_rate', '--compression-rate-file',
                                              '{root}/increasing.json'], ['increas']),
    ('schedule file that merges more than it keeps', ['--data-path', '{data}', '--eval', '--resume',
                                                      '{out}/checkpoint.pth', '--load_compression_rate',
                                                      '--compression-rate-file', '{root}/merge_above_prune.json'],
     ['merge']),
    ('unknown model', ['--data-path', '{data}', '--model', 'vit_deit_huge'], ['vit_deit_huge']),
]


@pytest.mark.parametrize('name,argv,words', MAIN_CASES, ids=[case[0] for case in MAIN_CASES])
def test_main_rejects_bad_input_in_one_line(finished, capsys, name, argv, words):
    data, out, root = finished
    before = snapshot(out)
    filled = [a.format(data=data, out=out, root=root) for a in COMMON + argv]
    try:
        code = entry.run(filled)
    except SystemExit as exit_:  # argument errors found by the parser
        code = exit_.code
    captured = capsys.readouterr()
    assert_one_error_line(code, captured.out, captured.err, words)
    assert snapshot(out) == before, 'the finished run must be left as it was'


TOOL_CASES = [
    ('predict: missing checkpoint', predict.main, ['{root}/none.pth', '{data}/val'], ['none.pth']),
    ('predict: random bytes', predict.main, ['{root}/junk.pth', '{data}/val'], ['junk.pth']),
    ('predict: no images', predict.main, ['{out}/model_best.pth', '{root}/empty'], ['no images']),
    ('export: missing checkpoint', export.main, ['release', '{root}/none.pth', '{root}/r.pth'], ['none.pth']),
    ('export: release into a missing folder', export.main, ['release', '{out}/model_best.pth', '{root}/no/r.pth'],
     ['r.pth', 'does not exist']),
    ('export: unknown command', export.main, ['zip', '{out}/model_best.pth'], ['zip']),
    ('predict: output into a missing folder', predict.main, ['{out}/model_best.pth', '{data}/val', '--out',
                                                             '{root}/no/such/p.csv'], ['no/such/p.csv']),
    ('benchmark: CUDA without a GPU', benchmark.main, ['--device', 'cuda', '--parts', 'sqrt'], ['CUDA']),
    ('compare: not predictions', compare.main, ['{out}/args.json', '{out}/args.json'], ['predictions']),
    ('results: no runs', results.main, ['{root}/nowhere/*'], ['nowhere']),
    ('visualize: missing run', visualize.main, ['{root}/nowhere'], ['nowhere']),
    ('make_splits: missing source', make_splits.main, ['--source', '{root}/nowhere', '--dest', '{root}/splits',
                                                       '--train-ratio', '0.2'], ['nowhere']),
    ('make_splits: ratio above 1', make_splits.main, ['--source', '{data}/train', '--dest', '{root}/splits',
                                                      '--train-ratio', '1.5'], ['1.5']),
    ('compare: missing option value', compare.main, ['{out}/args.json', '--resamples'], ['--resamples']),
]


@pytest.mark.parametrize('name,tool,argv,words', TOOL_CASES, ids=[case[0] for case in TOOL_CASES])
def test_tools_reject_bad_input_in_one_line(finished, capsys, name, tool, argv, words):
    data, out, root = finished
    (root / 'empty').mkdir(exist_ok=True)
    before = snapshot(out)
    try:
        code = tool([a.format(data=data, out=out, root=root) for a in argv])
    except SystemExit as exit_:  # argparse's own usage errors
        code = exit_.code
    captured = capsys.readouterr()
    assert_one_error_line(code, captured.out, captured.err, words)
    assert snapshot(out) == before


KILL_DURING_SAVE = '''
import os, signal, sys, torch
import main  # run with the repository as the working directory
original, calls = torch.save, []
def save(obj, path, *args, **kwargs):
    calls.append(path)
    if len(calls) == {victim}:  # write the start of this checkpoint, then die as a power cut would
        with open(path, 'wb') as f:
            f.write(b'x' * 1000)
        os.kill(os.getpid(), signal.SIGKILL)
    return original(obj, path, *args, **kwargs)
torch.save = save
sys.exit(main.run(sys.argv[1:]))
'''


def test_run_killed_while_writing_a_checkpoint_resumes_from_the_last_complete_one(tmp_path):
    data, out = make_image_folder(tmp_path / 'data'), tmp_path / 'out'
    argv = [str(a) for a in ['--data-path', data, '--output_dir', out] + COMMON]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    subprocess.run([sys.executable, '-c', KILL_DURING_SAVE.format(victim=0), *argv, '--epochs', '1'],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    complete = snapshot(out)
    killed = subprocess.run([sys.executable, '-c', KILL_DURING_SAVE.format(victim=1), *argv,
                             '--epochs', '2', '--autoresume'], cwd=ROOT, env=env, capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    leftovers = sorted(p.name for p in out.iterdir() if '.tmp' in p.name)
    assert leftovers, 'the kill happened inside a checkpoint write'
    for name in ('checkpoint.pth', 'model_best.pth'):
        assert snapshot(out)[name] == complete[name], f'{name} is still the complete one of epoch 0'
    resumed = subprocess.run([sys.executable, 'main.py', *argv, '--epochs', '2', '--autoresume'], cwd=ROOT, env=env,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert not [p.name for p in out.iterdir() if '.tmp' in p.name], 'stale temporary files are cleaned'
    assert [json.loads(line)['epoch'] for line in open(out / 'log.txt')] == [0, 1]


@pytest.mark.parametrize('poison', ['weights', 'rates'])
def test_training_that_turns_non_finite_stops_at_its_step_and_keeps_the_last_checkpoint(tmp_path, capsys,
                                                                                      monkeypatch, poison):
    """Weights (or rates) turned NaN before epoch 1: the run stops in epoch 1 at step 0 with one line
    that names the last complete checkpoint, which is left exactly as epoch 0 wrote it."""
    data, out = make_image_folder(tmp_path / 'data'), tmp_path / 'out'
    argv = [str(a) for a in ['--data-path', data, '--output_dir', out] + COMMON]
    assert entry.run(argv + ['--epochs', '1']) == 0
    complete = snapshot(out)
    train_one_epoch = entry.train_one_epoch

    def poisoned(model, **kwargs):
        with torch.no_grad():
            target = model.rates.logits if poison == 'rates' else model.blocks[3].mlp.fc1.weight
            target.fill_(float('nan'))
        return train_one_epoch(model, **kwargs)
    monkeypatch.setattr(entry, 'train_one_epoch', poisoned)
    capsys.readouterr()
    code = entry.run(argv + ['--epochs', '2', '--autoresume'])
    err = capsys.readouterr().err
    assert_one_error_line(code, '', err, ['epoch 1 at step 0', str(out / 'checkpoint.pth'), '(epoch 0)'])
    assert {k: v for k, v in snapshot(out).items() if k != 'args.json'} == \
        {k: v for k, v in complete.items() if k != 'args.json'}


def test_evaluating_a_checkpoint_with_non_finite_weights_is_refused(tmp_path, capsys):
    data, out = make_image_folder(tmp_path / 'data'), tmp_path / 'out'
    assert entry.run([str(a) for a in ['--data-path', data, '--output_dir', out, '--epochs', '1'] + COMMON]) == 0
    state = torch.load(out / 'model_best.pth', weights_only=True)
    state['model']['head.weight'][0, 0] = float('inf')
    torch.save(state, tmp_path / 'diverged.pth')
    capsys.readouterr()
    for tool, argv in ((entry.run, ['--data-path', data, '--eval', '--resume', tmp_path / 'diverged.pth'] + COMMON),
                       (predict.main, [tmp_path / 'diverged.pth', data / 'val'])):
        code = tool([str(a) for a in argv])
        assert_one_error_line(code, '', capsys.readouterr().err, ['not finite', 'head.weight'])


class BrokenMessage(Exception):
    def __str__(self):
        raise RuntimeError('formatting fails too')


@pytest.mark.parametrize('error', [
    UserError(''), UserError('first line\nsecond line\n'), UserError(42, ['not', 'a', 'string']),
    OSError(), OSError(2, None), OSError(13, 'Permission denied', b'bytes/path'), ValueError('\n\n'),
    BrokenMessage(), KeyError(None), RuntimeError('a\r\nb'),
], ids=lambda e: type(e).__name__ + ':' + repr(getattr(e, 'args', ''))[:20])
def test_the_error_boundary_reports_any_exception_in_one_line(capsys, error):
    @error_boundary
    def tool():
        raise error
    code = tool()
    err = capsys.readouterr().err
    assert code in (1, 2) and err.count('\n') == 1 and err.startswith('error: ') and len(err.strip()) > len('error:')
