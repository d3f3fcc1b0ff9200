"""Bad input found by generators (hypothesis), not by a list: files derived from good ones
(truncated at any byte, empty, random bytes, one byte changed, JSON and torch files of the wrong
shape, odd images) and numeric flags (0, negative, NaN, inf, huge), against every entry point.

The property: the tool succeeds, or it exits non-zero with exactly one `error:` line, no traceback
and no unforeseen error, and every file that existed before is unchanged.

`make test` runs a small, fixed set of examples per generator; `make test-bad-input` runs many
random ones (HYPOTHESIS_PROFILE=thorough).
"""
import contextlib
import hashlib
import io
import json
import os
import shutil
import uuid

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import compare
import export
import main as entry
import make_splits
import predict
import results
import visualize
from test_pipeline import FAST, MODEL, TARGET, make_image_folder

settings.register_profile('default', max_examples=6, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile('thorough', max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get('HYPOTHESIS_PROFILE', 'default'))

COMMON = ['--model', MODEL, '--target_flops', TARGET] + FAST


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    """Good files of every kind: an image folder, a finished search run with its evaluation
    (predictions.csv) and a release file; `scratch` receives the bad files."""
    root = tmp_path_factory.mktemp('bad_input')
    data, out = make_image_folder(root / 'data'), root / 'run'
    assert entry.run([str(a) for a in ['--data-path', data, '--output_dir', out, '--epochs', '1'] + COMMON]) == 0
    assert entry.run([str(a) for a in ['--data-path', data, '--eval', '--resume', out / 'checkpoint.pth',
                                       '--output_dir', out / 'eval', '--throughput-batch', '0'] + COMMON]) == 0
    assert export.main(['release', str(out / 'model_best.pth'), str(root / 'release.pth')]) == 0
    scratch = root / 'scratch'
    scratch.mkdir()
    return {'root': root, 'data': data, 'run': out, 'scratch': scratch}


# --- the property -------------------------------------------------------------------------------
def snapshot(*folders):
    """sha256 of every file under the folders, by path."""
    return {os.path.join(d, f): hashlib.sha256(open(os.path.join(d, f), 'rb').read()).hexdigest()
            for folder in folders for d, _, files in os.walk(folder) for f in files}


def assert_clean_outcome(tool, argv, world, also=()):
    """Run the entry point in-process: success, or one `error:` line with a non-zero exit; the
    good files (and the bad ones under scratch) are left as they were."""
    watched = [world['data'], world['run'], world['root'] / 'release.pth', *also]
    before = snapshot(*[w for w in watched if os.path.isdir(w)])
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = tool([str(a) for a in argv])
        except SystemExit as exit_:  # argparse's errors
            code = exit_.code
    err = stderr.getvalue()
    assert 'Traceback' not in stdout.getvalue() + err
    if code != 0:
        errors = [line for line in err.splitlines() if line.startswith('error:')]
        assert len(errors) == 1, err
        assert not errors[0].startswith('error: unexpected '), errors[0]  # every failure foreseen
    after = snapshot(*[w for w in watched if os.path.isdir(w)])
    assert {k: v for k, v in after.items() if k in before} == before, 'a file that existed was changed'
    return code, err


def fresh(world, name):
    """A new path under scratch (examples never share files)."""
    folder = world['scratch'] / uuid.uuid4().hex[:8]
    folder.mkdir()
    return folder / name


# --- generators ---------------------------------------------------------------------------------
def derived_bytes(good: bytes):
    """Bytes derived from a good file: truncated at any byte, empty, random, one byte changed."""
    return st.one_of(
        st.integers(0, len(good) - 1).map(lambda n: good[:n]),
        st.just(b''),
        st.binary(min_size=1, max_size=512),
        st.tuples(st.integers(0, len(good) - 1), st.integers(0, 255)).map(
            lambda change: good[:change[0]] + bytes([change[1]]) + good[change[0] + 1:]))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10 ** 6, 10 ** 6) | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8)
counts = st.lists(st.one_of(st.integers(-5, 60), st.floats(), st.text(max_size=3)), min_size=0, max_size=14)


def mutated(good: dict):
    """A dict derived from a good one: replaced whole, one value replaced, a key dropped or added."""
    keys = sorted(good)
    return st.one_of(
        json_values,
        st.tuples(st.sampled_from(keys), json_values).map(lambda kv: {**good, kv[0]: kv[1]}),
        st.sampled_from(keys).map(lambda k: {key: v for key, v in good.items() if key != k}),
        st.tuples(st.text(max_size=6), json_values).map(lambda kv: {**good, kv[0]: kv[1]}))


def write_json(path, value):
    path.write_text(json.dumps(value))  # NaN and inf as JSON's NaN / Infinity tokens, as json writes them
    return path


def image_bytes(kind: str) -> bytes:
    """Odd but real images, and files that are not images."""
    buffer = io.BytesIO()
    if kind == 'text':
        return b'not an image\n'
    mode, size, fmt = {'1x1': ('RGB', 1, 'JPEG'), 'grey': ('L', 40, 'PNG'), 'cmyk': ('CMYK', 40, 'JPEG'),
                       '16bit': ('I;16', 40, 'PNG'), 'rgba': ('RGBA', 40, 'PNG'), 'palette': ('P', 40, 'PNG')}[kind]
    Image.new(mode, (size, size)).save(buffer, format=fmt)
    return buffer.getvalue()


odd_images = st.sampled_from(['text', '1x1', 'grey', 'cmyk', '16bit', 'rgba', 'palette']).map(image_bytes)


def bad_image(world):
    good = open(sorted((world['data'] / 'val' / 'forest').iterdir())[0], 'rb').read()
    return st.one_of(derived_bytes(good), odd_images)


def checkpoint_of_wrong_shape(good: dict):
    """A checkpoint dict with one entry dropped or replaced by plain data of another shape, or one
    weight tensor replaced by NaN/inf or by a tensor of another shape."""
    weights = sorted(good['model'])

    def replace_weight(choice):
        name, kind = choice
        tensor = good['model'][name]
        if kind == 'shape':
            new = torch.zeros(tensor.numel() + 1)
        else:
            new = torch.full_like(tensor.float(), float(kind))
        return {**good, 'model': {**good['model'], name: new}}
    return st.one_of(
        mutated(good),
        st.tuples(st.sampled_from(weights), st.sampled_from(['nan', 'inf', '-inf', 'shape'])).map(replace_weight))


def torch_bytes(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def bad_checkpoint(world, name='checkpoint.pth'):
    path = world['run'] / name
    return st.one_of(derived_bytes(path.read_bytes()),
                     checkpoint_of_wrong_shape(torch.load(path, weights_only=True)).map(torch_bytes))


numbers = st.one_of(st.sampled_from(['0', '-1', 'nan', 'inf', '-inf', '1e308', '-1e308', '1e-320']),
                    st.floats().map(repr), st.integers(-10 ** 12, 10 ** 12).map(str))


# --- main.py ------------------------------------------------------------------------------------
@given(data=st.data())
def test_main_eval_of_bad_checkpoints(world, data):
    path = fresh(world, 'checkpoint.pth')
    path.write_bytes(data.draw(bad_checkpoint(world)))
    flag = data.draw(st.sampled_from(['--resume', '--finetune']))
    assert_clean_outcome(entry.run, ['--data-path', world['data'], '--eval', flag, path, '--throughput-batch', '0']
                         + COMMON, world)


@given(data=st.data())
def test_main_search_from_bad_weights(world, data):
    path = fresh(world, 'weights.pth')
    path.write_bytes(data.draw(bad_checkpoint(world, 'model_best.pth')))
    assert_clean_outcome(entry.run, ['--data-path', world['data'], '--finetune', path, '--epochs', '1',
                                     '--search-mode', 'arch', '--output_dir', path.parent / 'out'] + COMMON, world)


@given(data=st.data())
def test_main_eval_of_bad_schedule_files(world, data):
    good = json.loads((world['run'] / 'compression_rate.json').read_text())
    entry_value = good[MODEL][TARGET]
    schedule = st.fixed_dictionaries({'prune_kept_num': counts, 'merge_kept_num': counts})
    table = data.draw(st.one_of(
        mutated(good),
        mutated(good[MODEL]).map(lambda v: {MODEL: v}),
        mutated(entry_value).map(lambda v: {MODEL: {TARGET: v}}),
        schedule.map(lambda v: {MODEL: {TARGET: v}}),
        schedule.map(lambda v: {'ViT-T-DeiT': {TARGET: {k: json.dumps(c) for k, c in v.items()}}}),
        st.just({'sdt2net_small_patch16_224': good[MODEL]})))
    path = fresh(world, 'compression_rate.json')
    raw = data.draw(st.one_of(st.just(json.dumps(table).encode()),
                              derived_bytes((world['run'] / 'compression_rate.json').read_bytes())))
    path.write_bytes(raw)
    assert_clean_outcome(entry.run, ['--data-path', world['data'], '--eval', '--resume',
                                     world['run'] / 'checkpoint.pth', '--load_compression_rate',
                                     '--compression-rate-file', path, '--throughput-batch', '0'] + COMMON, world)


@given(data=st.data())
def test_main_eval_of_a_checkpoint_that_needs_a_bad_args_json(world, data):
    """A checkpoint without stored arguments is described by the args.json beside it."""
    folder = fresh(world, 'x').parent
    state = torch.load(world['run'] / 'model_best.pth', weights_only=True)
    torch.save({k: v for k, v in state.items() if k != 'args'}, folder / 'model_best.pth')
    good = json.loads((world['run'] / 'args.json').read_text())
    (folder / 'args.json').write_bytes(data.draw(st.one_of(
        mutated(good).map(lambda v: json.dumps(v).encode()),
        derived_bytes((world['run'] / 'args.json').read_bytes()))))
    tool = data.draw(st.sampled_from(['predict', 'export']))
    if tool == 'predict':
        assert_clean_outcome(predict.main, [folder / 'model_best.pth', world['data'] / 'val', '--out',
                                            folder / 'p.csv'], world, [folder])
    else:
        assert_clean_outcome(export.main, ['release', folder / 'model_best.pth', folder / 'r.pth'], world, [folder])


@given(data=st.data())
def test_main_eval_of_a_data_folder_with_a_bad_image(world, data):
    folder = fresh(world, 'data')
    shutil.copytree(world['data'], folder)
    victim = sorted((folder / data.draw(st.sampled_from(['val', 'train'])) / 'harbor').iterdir())[0]
    victim.write_bytes(data.draw(bad_image(world)))
    run = ['--data-path', folder, '--throughput-batch', '0'] + COMMON
    if data.draw(st.booleans()):
        run += ['--eval', '--resume', world['run'] / 'checkpoint.pth']
    else:
        run += ['--epochs', '1', '--output_dir', folder.parent / 'out']
    assert_clean_outcome(entry.run, run, world)


@given(flag=st.sampled_from(sorted(entry.NUMERIC_RANGES)), value=numbers)
def test_main_numeric_flags(world, flag, value):
    """Every numeric option with 0, negative, NaN, inf, huge or random values; a value that is
    accepted runs one short epoch of a search on synthetic data."""
    name = '--' + (flag if flag in entry.UNDERSCORE_FLAGS else flag.replace('_', '-'))
    out = fresh(world, 'out')
    argv = ['--data-set', 'synthetic', '--synthetic-classes', '3', '--synthetic-train-size', '8',
            '--synthetic-val-size', '4', '--epochs', '1', '--output_dir', out] + COMMON + [name, value]
    assert_clean_outcome(entry.run, argv, world)


# --- the other tools ----------------------------------------------------------------------------
@given(data=st.data())
def test_predict_and_export_of_bad_checkpoints_and_release_files(world, data):
    source = data.draw(st.sampled_from(['model_best.pth', 'release']))
    good = world['root'] / 'release.pth' if source == 'release' else world['run'] / source
    path = fresh(world, 'model.pth')
    wrong_shape = checkpoint_of_wrong_shape(torch.load(good, weights_only=True)).map(torch_bytes)
    path.write_bytes(data.draw(st.one_of(derived_bytes(good.read_bytes()), wrong_shape)))
    if data.draw(st.booleans()):
        assert_clean_outcome(predict.main, [path, world['data'] / 'val', '--out', path.parent / 'p.jsonl'], world)
    else:
        assert_clean_outcome(export.main, ['release', path, path.parent / 'r.pth'], world)


@given(data=st.data())
def test_predict_on_bad_images_and_image_lists(world, data):
    folder = fresh(world, 'images')
    folder.mkdir()
    for index in range(data.draw(st.integers(1, 3))):
        (folder / f'image{index}.jpg').write_bytes(data.draw(bad_image(world)))
    listing = folder.parent / 'list.txt'
    listing.write_text('\n'.join(data.draw(st.lists(st.one_of(
        st.just(str(folder / 'image0.jpg')), st.text(max_size=20).filter(lambda t: '\x00' not in t)), max_size=4))))
    target = data.draw(st.sampled_from([folder, listing]))
    topk = data.draw(st.sampled_from(['5', '1', '0', '-3', '100']))
    code, err = assert_clean_outcome(predict.main, [world['run'] / 'model_best.pth', target, '--topk', topk,
                                                    '--out', folder.parent / 'p.csv'], world)
    if code == 0:
        assert (folder.parent / 'p.csv').is_file()


@given(data=st.data())
def test_compare_bad_predictions(world, data):
    good = (world['run'] / 'eval' / 'predictions.csv').read_bytes()
    path = fresh(world, 'predictions.csv')
    lines = good.decode().splitlines()
    def with_header(rows):
        return '\n'.join(lines[:1] + rows).encode()
    cells = st.text(max_size=5).filter(lambda t: ',' not in t and '\n' not in t and '\r' not in t)
    path.write_bytes(data.draw(st.one_of(
        derived_bytes(good),
        st.lists(st.sampled_from(lines[1:]), max_size=6).map(with_header),
        st.lists(st.lists(cells, max_size=5).map(','.join), max_size=5).map(with_header))))
    resamples = data.draw(st.sampled_from(['1000', '0', '-5', '10']))
    assert_clean_outcome(compare.main, [path, world['run'] / 'eval' / 'predictions.csv', '--resamples', resamples],
                         world)


@given(data=st.data())
def test_results_and_visualize_of_bad_run_folders(world, data):
    folder = fresh(world, 'run')
    shutil.copytree(world['run'], folder, ignore=shutil.ignore_patterns('*.pth'))
    name = data.draw(st.sampled_from(['args.json', 'log.txt', 'eval/eval_metrics.json']))
    good = (folder / name).read_bytes()
    value = json.loads(good.decode().splitlines()[-1] if name == 'log.txt' else good)  # a log line, or the file
    bad = data.draw(st.one_of(derived_bytes(good), mutated(value).map(lambda v: json.dumps(v).encode())))
    (folder / name).write_bytes(bad)
    if data.draw(st.booleans()):
        assert_clean_outcome(results.main, [folder], world)
    else:
        assert_clean_outcome(visualize.main, [folder], world)


@given(ratio=numbers, seed=numbers, extra=st.sampled_from(['none', 'empty class', 'odd file', 'one image']))
def test_make_splits_numbers_and_odd_sources(world, ratio, seed, extra):
    source = fresh(world, 'source')
    shutil.copytree(world['data'] / 'train', source)
    if extra == 'empty class':
        (source / 'desert').mkdir()
    elif extra == 'odd file':
        (source / 'river' / 'notes.jpg').write_bytes(b'not an image')
    elif extra == 'one image':
        for path in sorted((source / 'river').iterdir())[1:]:
            path.unlink()
    assert_clean_outcome(make_splits.main, ['--source', source, '--dest', source.parent / 'splits',
                                            '--train-ratio', ratio, '--seed', seed], world)



@given(data=st.data())
def test_export_quantized_with_bad_calibration(world, data):
    """--quantize static with no calibration folder, a folder of other or missing classes, or a
    count below one: refused before anything is exported."""
    folder = fresh(world, 'calibration')
    classes = data.draw(st.lists(st.sampled_from(['forest', 'harbor', 'river', 'beach', 'desert']), unique=True,
                                 max_size=4).filter(lambda c: sorted(c) != ['forest', 'harbor', 'river']))
    make_image_folder(folder, classes=tuple(classes), train=1, val=0, size=16) if classes else folder.mkdir()
    flags = data.draw(st.sampled_from([[], ['--calibration', folder / 'train'], ['--calibration', folder]]))
    count = data.draw(st.one_of(st.just([]), numbers.map(lambda n: ['--calibration-images', n])))
    target = folder.parent / 'int8.onnx'
    code, _ = assert_clean_outcome(export.main, ['onnx', world['run'] / 'model_best.pth', target, '--quantize',
                                                 'static'] + flags + count, world)
    assert code != 0 and not target.exists()
