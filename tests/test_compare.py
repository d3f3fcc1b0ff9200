"""compare.py and workflow.stats: the paired difference, its bootstrap interval and McNemar's test."""
import numpy as np
import pytest

import compare
from workflow import stats


def write(path, correct):
    lines = ['index,file,target,prediction'] + [f'{i},c/{i}.jpg,1,{1 if ok else 0}' for i, ok in enumerate(correct)]
    path.write_text('\n'.join(lines) + '\n')
    return str(path)


def test_paired_difference_interval_and_mcnemar(tmp_path):
    rng = np.random.default_rng(1)
    a = rng.random(2000) < 0.70
    b = a.copy()
    flip = rng.choice(2000, 100, replace=False)  # B loses 100 images A gets right, wins none
    b[flip] = False
    a[flip] = True
    result = stats.compare_files(write(tmp_path / 'a.csv', a), write(tmp_path / 'b.csv', b), resamples=2000)
    assert result['difference'] == pytest.approx(100 * (a.mean() - b.mean()))
    assert result['ci_low'] < result['difference'] < result['ci_high'] and result['ci_low'] > 0
    assert result['only_b_correct'] == 0 and result['mcnemar_p'] < 1e-20
    same = stats.compare_files(write(tmp_path / 'c.csv', a), write(tmp_path / 'd.csv', a), resamples=500)
    assert same['difference'] == 0 and same['ci_low'] == same['ci_high'] == 0 and same['mcnemar_p'] == 1


def test_mcnemar_exact_matches_the_binomial_tail():
    # 2 against 8 discordant pairs: 2 * P(X <= 2), X ~ Binomial(10, 1/2) = 2 * 56 / 1024
    assert stats.mcnemar_exact(2, 8) == pytest.approx(112 / 1024)


def test_different_images_are_refused(tmp_path, capsys):
    a = write(tmp_path / 'a.csv', [True, False])
    b = tmp_path / 'b.csv'
    b.write_text('index,file,target,prediction\n0,c/x.jpg,1,1\n1,c/y.jpg,1,1\n')
    assert compare.main([a, str(b)]) == 2
    assert 'not evaluations of the same images' in capsys.readouterr().err
