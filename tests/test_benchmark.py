"""benchmark.py: every part runs and reports its ratios; the built-in schedule is DiffRate's."""
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

import benchmark
from conftest import REFERENCE_SCHEDULES, ROOT


def test_benchmark_runs_every_part_and_reports_every_ratio(tmp_path):
    report = tmp_path / 'bench.json'
    subprocess.run([sys.executable, 'benchmark.py', '--batch-size', '2', '--inference-batches', '1', '2',
                    '--repeats', '1', '--warmup', '0', '--json', str(report)], cwd=ROOT, check=True, capture_output=True)
    results = json.loads(report.read_text())
    expected = [f'{ratio} batch {batch}' for batch in (1, 2)
                for ratio in ('speedup/flops-ratio EAB/FTF off', 'speedup/flops-ratio EAB+FTF',
                              'full-keep throughput / timm', 'EAB+FTF at DeiT-S FLOPs throughput / timm')]
    expected += ['train step / timm', 'pade speedup over eigh', 'pade max relative error',
                'pade max relative gradient error']
    for key in expected:
        assert math.isfinite(results[key]) and results[key] > 0, (key, results.get(key))
    assert results['pade max relative error'] < 1e-3


@pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ('onnx', 'onnxruntime', 'onnxscript')),
                    reason='optional packages of requirements-export.txt not installed')
def test_onnx_part_reports_the_deployed_ratios(tmp_path):
    report = tmp_path / 'bench.json'
    subprocess.run([sys.executable, 'benchmark.py', '--parts', 'onnx', '--onnx-settings', 'tiny', '--onnx-input-size',
                    '48', '--onnx-no-optimize', '--inference-batches', '1', '3', '--repeats', '1', '--warmup', '0',
                    '--json', str(report)], cwd=ROOT, check=True, capture_output=True)
    results = json.loads(report.read_text())
    for batch in (1, 3):
        for ratio in ('speedup/flops-ratio EAB/FTF off', 'speedup/flops-ratio EAB+FTF', 'EAB+FTF at DeiT FLOPs / timm',
                      'onnxruntime over eager', 'floor speedup/flops-ratio'):
            value = results[f'onnx tiny {ratio} batch {batch}']
            assert math.isfinite(value) and value > 0


@pytest.mark.skipif(not os.path.exists(REFERENCE_SCHEDULES), reason='needs ../shared/reference')
def test_builtin_schedule_equals_diffrates_published_one():
    assert benchmark.vit_s_2_9_schedule() == benchmark.VIT_S_2_9


def test_ratios_pair_the_two_cases_round_by_round():
    """benchmark.py's ratios are medians of the ratio within each round (a change of the machine's
    speed that lasts a round cancels), with their quartiles; one round gives its own ratio."""
    from workflow.timing import paired_ratio
    assert paired_ratio([1.0, 2.0, 4.0], [2.0, 8.0, 4.0]) == (0.5, 0.375, 0.75)  # ratios 0.5, 0.25, 1.0
    slowed = [3.0, 1.0, 1.0, 3.0, 1.0]  # rounds 1 and 4 ran 3x slower for both cases
    assert paired_ratio([2 * s for s in slowed], slowed) == (2.0, 2.0, 2.0)
    assert paired_ratio([3.0], [2.0]) == (1.5, 1.5, 1.5)


def test_vits_part_reports_compression_on_the_vits_people_start_from(tmp_path):
    report = tmp_path / 'bench.json'
    subprocess.run([sys.executable, 'benchmark.py', '--parts', 'vits', '--vit-input-size', '56', '--onnx-no-optimize',
                    '--inference-batches', '2', '--repeats', '1', '--warmup', '0', '--json', str(report)],
                   cwd=ROOT, check=True, capture_output=True)
    results = json.loads(report.read_text())
    runtimes = ('eager', 'onnx') if all(importlib.util.find_spec(m) for m in ('onnx', 'onnxruntime', 'onnxscript')) \
        else ('eager',)
    for setting in ('vit_b16', 'dinov2_s14'):
        for runtime in runtimes:
            value = results[f'vits {setting} {runtime} speedup/flops-ratio batch 2']
            assert math.isfinite(value) and value > 0


@pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ('onnx', 'onnxruntime', 'onnxscript')),
                    reason='optional packages of requirements-export.txt not installed')
def test_int8_part_reports_every_row_against_the_dense_fp32_graph(tmp_path):
    report = tmp_path / 'bench.json'
    subprocess.run([sys.executable, 'benchmark.py', '--parts', 'int8', '--int8-settings', 'tiny', '--int8-threads', '1',
                    '--onnx-no-optimize', '--inference-batches', '2', '--repeats', '1', '--warmup', '0',
                    '--json', str(report)], cwd=ROOT, check=True, capture_output=True)
    results = json.loads(report.read_text())
    for graph in ('dense fp32', 'dense int8 dynamic', 'dense int8 static', 'compressed fp32',
                  'compressed int8 dynamic', 'compressed int8 static'):
        value = results[f'int8 tiny {graph} threads 1 batch 2']
        assert math.isfinite(value) and value > 0
        assert results[f'int8 tiny MB {graph}'] > 0
    assert results['int8 tiny dense fp32 threads 1 batch 2'] == 1.0
    assert results['int8 tiny MB dense int8 dynamic'] < 0.5 * results['int8 tiny MB dense fp32']
