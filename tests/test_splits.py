"""make_splits.py: stratified, reproducible, clear errors."""
import json
import os

from PIL import Image

import make_splits


def make_raw(root, counts):
    for name, n in counts.items():
        os.makedirs(root / name)
        for i in range(n):
            Image.new('RGB', (8, 8), (i, 0, 0)).save(root / name / f'{name}_{i:03d}.jpg')
    return root


def listing(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files
                  if f.endswith('.jpg'))


def test_stratified_reproducible_and_complete(tmp_path, capsys):
    raw = make_raw(tmp_path / 'raw', {'airport': 10, 'beach': 20, 'church': 5})
    assert make_splits.main(['--source', str(raw), '--dest', str(tmp_path / 'a'), '--train-ratio', '0.2']) == 0
    assert make_splits.main(['--source', str(raw), '--dest', str(tmp_path / 'b'), '--train-ratio', '0.2',
                             '--mode', 'copy']) == 0
    assert listing(tmp_path / 'a') == listing(tmp_path / 'b')
    split = json.load(open(tmp_path / 'a' / 'split.json'))
    assert [len(split['files']['beach'][0]), len(split['files']['beach'][1])] == [4, 16]
    assert len(split['files']['church'][0]) == 1
    for name in ('airport', 'beach', 'church'):
        train, val = split['files'][name]
        assert not set(train) & set(val) and len(train) + len(val) == len(os.listdir(raw / name))
    assert make_splits.main(['--source', str(raw), '--dest', str(tmp_path / 'c'), '--train-ratio', '0.2',
                             '--seed', '1']) == 0
    assert listing(tmp_path / 'c') != listing(tmp_path / 'a')


def test_bad_input(tmp_path, capsys):
    raw = make_raw(tmp_path / 'raw', {'airport': 3})
    os.makedirs(raw / 'desert')
    assert make_splits.main(['--source', str(raw), '--dest', str(tmp_path / 'x'), '--train-ratio', '0.5']) == 2
    assert 'desert' in capsys.readouterr().err
    assert make_splits.main(['--source', str(tmp_path / 'none'), '--dest', str(tmp_path / 'y'),
                             '--train-ratio', '0.5']) == 2
    assert make_splits.main(['--source', str(raw), '--dest', str(tmp_path / 'z'), '--train-ratio', '1.5']) == 2
    assert not os.path.exists(tmp_path / 'x') and not os.path.exists(tmp_path / 'y')
