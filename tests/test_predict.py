"""predict.py: classes, input size and schedule from the checkpoint; bad files skipped."""
import csv
import json

import main as entry
import predict
from test_pipeline import FAST, MODEL, TARGET, make_image_folder


def test_predict_folder_skips_a_corrupt_file_and_explains(tmp_path, capsys):
    data, out = make_image_folder(tmp_path / 'data'), tmp_path / 'out'
    assert entry.run([str(a) for a in ['--data-path', data, '--model', MODEL, '--target_flops', TARGET,
                                       '--epochs', '1', '--output_dir', out] + FAST]) == 0
    capsys.readouterr()
    new = tmp_path / 'new' / 'nested'
    new.mkdir(parents=True)
    for name in ('b.jpg', 'a.jpg'):
        (new / name).write_bytes((data / 'val' / 'river' / 'river_0.jpg').read_bytes())
    (new / 'broken.jpg').write_bytes(b'not an image')
    rows_file = tmp_path / 'pred.csv'
    assert predict.main([str(out / 'model_best.pth'), str(tmp_path / 'new'), '--out', str(rows_file),
                         '--topk', '2', '--explain', str(tmp_path / 'explain')]) == 0
    err = capsys.readouterr().err
    assert err.count('skipped') == 1 and 'broken.jpg' in err
    rows = list(csv.DictReader(open(rows_file)))
    assert [r['file'].rsplit('/', 1)[-1] for r in rows] == ['a.jpg', 'b.jpg'], 'sorted, corrupt file left out'
    assert rows[0]['top1'] in ('forest', 'harbor', 'river') and 0 < float(rows[0]['top1_prob']) <= 1
    assert rows[0]['top1'] == rows[1]['top1'], 'the same image gets the same answer'
    assert sorted(p.name for p in (tmp_path / 'explain').iterdir()) == ['a_tokens.png', 'b_tokens.png']
    assert predict.main([str(out / 'checkpoint.pth'), str(new / 'a.jpg'), '--out', str(tmp_path / 'p.jsonl')]) == 0
    row = json.loads(open(tmp_path / 'p.jsonl').read())
    assert row['classes'][0] == rows[0]['top1'] and len(row['classes']) == 3


def test_predict_reports_missing_input_in_one_line(tmp_path, capsys):
    assert predict.main([str(tmp_path / 'none.pth'), str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith('error: checkpoint not found')
