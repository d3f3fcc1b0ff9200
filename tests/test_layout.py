"""The design card's layout: its names at the top level hold their code, imports only run downward
(entry points on top), and the README's Python snippets run as written."""
import ast
import os
import re
import subprocess
import sys

import torch

import main as entry
from conftest import ROOT
from workflow.runs import load_trained_model

CARD = ('main.py', 'engine.py', 'datasets.py', 'models/__init__.py', 'utils.py', 'losses.py', 'compression_rate.json',
        'figures', 'requirements.txt', 'README.md', 'tests')
# The library's floors: a module imports only from floors below its own (and its own package).
FLOORS = {'utils': 0, 'models': 1, 'losses': 1, 'datasets': 1, 'workflow': 2, 'engine': 3}
ENTRY_POINTS = ('main', 'predict', 'export', 'compare', 'results', 'visualize', 'make_splits', 'launch', 'benchmark')


def local_imports(path: str):
    """Top-level names of this repository that the file imports (relative imports: its package)."""
    names = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split('.')[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split('.')[0])
    return names & (set(FLOORS) | set(ENTRY_POINTS))


def library_files():
    for name in FLOORS:
        if os.path.isdir(os.path.join(ROOT, name)):
            for file in sorted(os.listdir(os.path.join(ROOT, name))):
                if file.endswith('.py'):
                    yield name, os.path.join(ROOT, name, file)
        else:
            yield name, os.path.join(ROOT, name + '.py')


def test_the_cards_names_are_at_the_top_level():
    missing = [name for name in CARD if not os.path.exists(os.path.join(ROOT, name))]
    assert not missing


def test_imports_run_downward_and_entry_points_import_no_entry_point():
    upward = []
    for floor_name, path in library_files():
        for imported in local_imports(path):
            if imported != floor_name and (imported in ENTRY_POINTS or FLOORS[imported] >= FLOORS[floor_name]):
                upward.append(f'{os.path.relpath(path, ROOT)} imports {imported}')
    for name in ENTRY_POINTS:
        imported = local_imports(os.path.join(ROOT, name + '.py')) & set(ENTRY_POINTS)
        upward += [f'{name}.py imports {other}' for other in imported]
    # the experiment scripts are entry points too: what two of them need lives in the library
    for file in sorted(os.listdir(os.path.join(ROOT, 'experiments'))):
        if file.endswith('.py'):
            tree = ast.parse(open(os.path.join(ROOT, 'experiments', file)).read())
            upward += [f'experiments/{file} imports {node.module}' for node in ast.walk(tree)
                       if isinstance(node, ast.ImportFrom) and (node.module or '').startswith('experiments')]
            upward += [f'experiments/{file} imports {alias.name}' for node in ast.walk(tree)
                       if isinstance(node, ast.Import) for alias in node.names if alias.name.startswith('experiments')]
    assert not upward


def test_no_module_only_re_exports_another():
    """Every library module but a package's __init__ defines something of its own."""
    empty = []
    for _, path in library_files():
        if os.path.basename(path) == '__init__.py':
            continue
        body = ast.parse(open(path).read()).body
        if not any(isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.Assign, ast.AnnAssign)) for n in body):
            empty.append(os.path.relpath(path, ROOT))
    assert not empty


def test_import_models_registers_the_timm_names_from_the_root():
    code = "import models, timm; print(type(timm.create_model('sdt2net_tiny_patch16_224', img_size=32)).__name__)"
    result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={k: v for k, v in os.environ.items() if k != 'PYTHONPATH'})
    assert result.returncode == 0 and result.stdout.strip() == 'SDT2Net', result.stderr


def test_the_readme_python_snippets_run_as_written(tmp_path, capsys):
    """Each ```python block of the README runs; OUT/ is a run folder made here (the snippet's
    settings: 45 classes, 112 px, EAB and FTF off), and the model built from it with timm alone
    computes what load_trained_model's does."""
    out = tmp_path / 'run'
    assert entry.run([str(a) for a in [
        '--data-set', 'synthetic', '--synthetic-classes', '45', '--synthetic-train-size', '8',
        '--synthetic-val-size', '4', '--model', 'sdt2net_tiny_patch16_224', '--input-size', '112', '--no-eab',
        '--no-ftf', '--fixed-schedule', 'geometric', '--target_flops', '0.2', '--epochs', '1', '--batch-size', '4',
        '--num_workers', '0', '--warmup-epochs', '0', '--output_dir', out]]) == 0
    capsys.readouterr()
    snippets = re.findall(r'```python\n(.*?)```', open(os.path.join(ROOT, 'README.md')).read(), flags=re.S)
    assert snippets
    reference, _ = load_trained_model(str(out / 'model_best.pth'))
    images = torch.randn(2, 3, 112, 112)
    for snippet in snippets:
        namespace = {}
        exec(compile(snippet.replace('OUT/', f'{out}/'), 'README.md', 'exec'), namespace)
        if 'OUT/' in snippet:  # the snippets that load the run: the timm-built model is load_trained_model's
            model = namespace['model'].eval()
            assert model.schedule() == reference.schedule() and model.schedule().prune[-1] < 50
            with torch.no_grad():
                assert torch.allclose(model(images), reference(images), atol=1e-5)
