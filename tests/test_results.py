"""results.py: runs that differ only by seed are one row, mean +- sd; per-class CSV of --eval."""
import csv

import main as entry
import results
from test_pipeline import FAST, MODEL, SYNTHETIC, TARGET


def test_seeds_are_grouped_and_evaluations_preferred(tmp_path, capsys):
    for seed in (0, 1):
        out = tmp_path / f'run_seed{seed}'
        assert entry.run([str(a) for a in ['--model', MODEL, '--target_flops', TARGET, '--epochs', '1', '--seed',
                                           seed, '--output_dir', out] + FAST + SYNTHETIC]) == 0
    assert entry.run([str(a) for a in ['--eval', '--model', MODEL, '--resume', tmp_path / 'run_seed0' / 'checkpoint.pth',
                                       '--output_dir', tmp_path / 'run_seed0' / 'eval'] + FAST + SYNTHETIC]) == 0
    rows = list(csv.DictReader(open(tmp_path / 'run_seed0' / 'eval' / 'per_class.csv')))
    assert [r['class'] for r in rows] == ['class_00', 'class_01', 'class_02']
    assert all(0 <= float(r['f1']) <= 100 for r in rows)
    capsys.readouterr()
    assert results.main([str(tmp_path / 'run_*'), '--csv', '--columns', 'top1', 'gflops']) == 0
    table = list(csv.reader(capsys.readouterr().out.splitlines()))
    assert table[0] == ['run', 'seeds', 'top-1 (%)', 'GFLOPs'] and len(table) == 2
    assert table[1][0] == 'run_seed' and table[1][1] == '0, 1' and '+-' in table[1][2]
