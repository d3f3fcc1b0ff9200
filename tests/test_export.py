"""export.py: the release file loads wherever a checkpoint does; the ONNX graph runs in
onnxruntime with PyTorch's logits (skipped without the optional packages)."""
import importlib.util
import json

import pytest
import timm
import torch
from PIL import Image

import export
import main as entry
import models
import predict
from datasets import build_transform, load_rgb
from test_pipeline import FAST, MODEL, TARGET, make_image_folder
from workflow import onnx_export
from workflow.runs import load_trained_model

HAVE_ONNX = all(importlib.util.find_spec(name) for name in ('onnx', 'onnxruntime', 'onnxscript'))


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A short search on an image folder (EAB and FTF on): (data folder, run folder)."""
    root = tmp_path_factory.mktemp('export')
    data, out = make_image_folder(root / 'data', val=3), root / 'out'
    assert entry.run([str(a) for a in ['--data-path', data, '--model', MODEL, '--target_flops', TARGET,
                                       '--epochs', '1', '--output_dir', out] + FAST]) == 0
    return data, out


def logits_of(model, data) -> torch.Tensor:
    transform = build_transform(False, type('Args', (), {'input_size': 48})())
    images = torch.stack([transform(load_rgb(str(p))) for p in sorted((data / 'val').rglob('*.jpg'))])
    with torch.no_grad():
        return model(images)


def test_release_file_is_small_and_loads_like_the_checkpoint(trained, tmp_path, capsys):
    data, out = trained
    release = tmp_path / 'release.pth'
    assert export.main(['release', str(out / 'checkpoint.pth'), str(release)]) == 0
    content = torch.load(release, weights_only=True)
    assert 'optimizer' not in content and content['schedule']['fixed'] is True
    assert release.stat().st_size < (out / 'checkpoint.pth').stat().st_size / 2
    original, _ = load_trained_model(str(out / 'checkpoint.pth'))
    loaded, _ = load_trained_model(str(release))
    assert loaded.schedule() == original.schedule() and loaded.class_names == original.class_names
    assert torch.equal(logits_of(loaded, data), logits_of(original, data))
    # timm's own loader takes the weights (the schedule is the file's 'schedule' entry)
    net = timm.create_model(MODEL, checkpoint_path=str(release), num_classes=3, img_size=48, granularity=2)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in content['model'].items())
    capsys.readouterr()
    assert predict.main([str(release), str(data / 'val'), '--out', str(tmp_path / 'p.jsonl')]) == 0
    assert len(open(tmp_path / 'p.jsonl').readlines()) == 9
    # main.py evaluates it with its stored schedule, without a resume checkpoint
    assert entry.run([str(a) for a in ['--data-path', data, '--model', MODEL, '--eval', '--finetune', release,
                                       '--output_dir', tmp_path / 'eval'] + FAST]) == 0
    assert 'stored with the --finetune weights' in capsys.readouterr().out


def test_export_reports_a_missing_checkpoint_in_one_line(tmp_path, capsys):
    assert export.main(['release', str(tmp_path / 'none.pth'), str(tmp_path / 'r.pth')]) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: checkpoint not found') and err.count('\n') == 1
    assert not (tmp_path / 'r.pth').exists()


def test_export_numerics_agree_with_the_eager_operations():
    """The exported graph's Newton-Schulz inverse in the Pade root computes what the Cholesky
    inverse does, so its logits equal the eager model's (many tokens: a full-rank covariance)."""
    torch.manual_seed(0)
    model = timm.create_model(MODEL, num_classes=5, depth=3).eval()
    model.ftf.fc.weight.data.normal_(std=0.02)  # the classifier starts at zero; make it count
    model.fix_schedule(models.Schedule([197, 150, 120], [197, 130, 100]))
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        eager = model(x)
        with models.export_numerics():
            traced = model(x)
    assert (eager - traced).abs().max() < 1e-4


@pytest.mark.skipif(not HAVE_ONNX, reason='optional packages of requirements-export.txt not installed')
def test_onnx_export_runs_in_onnxruntime_with_pytorchs_logits(trained, tmp_path, capsys):
    import onnx
    data, out = trained
    path = tmp_path / 'model.onnx'
    assert export.main(['onnx', str(out / 'model_best.pth'), str(path), '--check', str(data / 'val'),
                        '--batch-size', '4', '--no-optimize']) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report['images'] == 9 and report['top1_agreement'] == 1.0
    assert report['max_abs_diff_traced'] < onnx_export.PARITY_TOLERANCE and report['images_over_tolerance'] == 0
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    model, _ = load_trained_model(str(out / 'model_best.pth'))
    assert json.loads(meta['class_names']) == model.class_names and meta['input_size'] == '48'
    # another batch size than the one traced: the batch dimension is dynamic
    runner = onnx_export.onnx_runner(str(path))
    x = torch.randn(5, 3, 48, 48)
    with torch.no_grad(), models.export_numerics():
        expected = model(x)
    got = torch.from_numpy(runner.run(None, {'images': x.numpy()})[0])
    assert (got - expected).abs().max() < onnx_export.PARITY_TOLERANCE
    # predict.py deploys the graph with the same command and gives the checkpoint's rows, on images
    # generated here (not the training data)
    new = tmp_path / 'new'
    new.mkdir()
    generator = torch.Generator().manual_seed(1)
    for index in range(5):
        pixels = (torch.rand(60, 70, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(new / f'image{index}.png')
    rows = {}
    for source in (out / 'model_best.pth', path):
        target = tmp_path / f'{source.suffix[1:]}.jsonl'
        assert predict.main([str(source), str(new), '--out', str(target), '--topk', '3']) == 0
        rows[source.suffix] = [json.loads(line) for line in open(target)]
    assert [r['classes'] for r in rows['.onnx']] == [r['classes'] for r in rows['.pth']]
    for ours, theirs in zip(rows['.onnx'], rows['.pth']):
        assert max(abs(a - b) for a, b in zip(ours['probs'], theirs['probs'])) < 1e-4


@pytest.mark.skipif(not HAVE_ONNX, reason='optional packages of requirements-export.txt not installed')
def test_exported_token_order_breaks_ties_as_the_stable_sort(tmp_path):
    from models.token_ops import sort_by_importance

    class Order(torch.nn.Module):
        def forward(self, importance):
            return sort_by_importance(importance, importance.shape[1] + 1)
    importance = torch.tensor([[0.2, 0.5, 0.2, 0.1, 0.5, 0.5, 0.2]])
    torch.onnx.export(Order().eval(), (importance,), str(tmp_path / 'order.onnx'), dynamo=True, verbose=False)
    runner = onnx_export.onnx_runner(str(tmp_path / 'order.onnx'))
    got = runner.run(None, {runner.get_inputs()[0].name: importance.numpy()})[0]
    assert got.tolist() == sort_by_importance(importance, 8).tolist() == [[0, 2, 5, 6, 1, 3, 7, 4]]


@pytest.mark.parametrize('eab', [False, True])
def test_exported_compression_keeps_the_tokens_sizes_and_owners_of_the_eager_one(eab):
    """The compression written for exported graphs (one-hot products, gathers along the tokens,
    only the kept patches ranked) gives the general path's tokens, sizes and patch owners, also
    from sizes and owners left by an earlier merge."""
    torch.manual_seed(0)
    model = timm.create_model(MODEL, num_classes=5, depth=4, eab=eab, ftf=False).eval()
    model.fix_schedule(models.Schedule([197, 150, 120, 100], [197, 130, 100, 60]))
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        tokens, state, owners = model.forward_tokens(x, return_owners=True)
        with models.export_numerics():
            exported, exported_state, exported_owners = model.forward_tokens(x, return_owners=True)
    assert exported.shape == tokens.shape == (3, 60, model.embed_dim)
    assert (exported - tokens).abs().max() < 1e-5
    assert torch.equal(exported_state.size, state.size) and state.size.max() > 1  # merges happened
    assert all(torch.equal(a, b) for a, b in zip(owners, exported_owners))


@pytest.mark.parametrize('shared,groups', [(True, 1), (False, 1), (True, 2)])
def test_exported_eab_runs_channels_first_with_the_eager_results(shared, groups):
    """Exported graphs run the EAB channels first, q and k side by side, with the qkv weight's q
    and k rows interleaved; the tokens after every block equal the eager path's, with one SCM or
    two and with grouped convolutions, before and after compressions."""
    torch.manual_seed(0)
    model = timm.create_model(MODEL, num_classes=5, depth=3, ftf=False, eab_shared=shared, eab_groups=groups).eval()
    for block in model.blocks:  # the SCMs start as the identity: make them count
        for scm in (block.eab.scm, block.eab.scm_k):
            if scm is not None:
                scm.reduce.weight.data.normal_(std=0.05)
                scm.reduce.bias.data.normal_(std=0.05)
    model.fix_schedule(models.Schedule([197, 150, 120], [197, 130, 100]))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        eager = model.forward_tokens(x)[0]
        with models.export_numerics():
            exported = model.forward_tokens(x)[0]
    assert eager.shape == (2, 100, model.embed_dim)
    assert (exported - eager).abs().max() < 1e-4


@pytest.mark.skipif(not HAVE_ONNX, reason='optional packages of requirements-export.txt not installed')
def test_quantized_export_round_trip_through_predict(trained, tmp_path, capsys):
    """export.py onnx --quantize static (calibrated on train/), then predict.py on the int8 file as
    on any graph: the answers of the fp32 checkpoint on generated images, the metadata of the fp32
    graph plus how it was quantized, a smaller file; --quantize dynamic from the same code."""
    import onnx
    from workflow.quantize import quantize
    data, out = trained
    path = tmp_path / 'int8.onnx'
    assert export.main(['onnx', str(out / 'model_best.pth'), str(path), '--quantize', 'static', '--calibration',
                        str(data / 'train'), '--calibration-images', '8', '--check', str(data / 'val'),
                        '--no-optimize']) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert 'int8 static' in printed[0]
    report = json.loads(printed[-1])
    assert report['images'] == 9 and report['top1_agreement'] >= 2 / 3  # near-ties of a one-epoch model flip
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    model, run_args = load_trained_model(str(out / 'model_best.pth'))
    assert json.loads(meta['class_names']) == model.class_names and meta['input_size'] == '48'
    info = json.loads(meta['quantization'])
    assert info['mode'] == 'static' and info['calibration_images'] == 8 and 'MatMul' in info['ops']
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert {'QuantizeLinear', 'DequantizeLinear', 'Softmax'} <= ops  # softmax stays in float
    # on the generated images of val/ (what the calibration images are like): int8 logits close to
    # fp32's against their spread; predict.py's answers are the graph's, and the fp32 model's
    # wherever its margin exceeds twice the int8 error
    images = sorted((data / 'val').rglob('*.jpg'))
    transform = build_transform(False, run_args)
    x = torch.stack([transform(load_rgb(str(p))) for p in images])
    with torch.no_grad():
        fp32 = model(x)
    int8 = onnx_export.OnnxClassifier(str(path))(x)
    error = (int8 - fp32).abs().max()
    # a one-epoch model's logits are small (their spread about 0.7) and 8 calibration images few:
    # the bound is loose, but each image's int8 logits lie nearer its own fp32 logits than others'
    assert error < 0.5 * (fp32.max() - fp32.min()), (error, fp32)
    others = fp32.roll(1, dims=0)
    assert (int8 - fp32).abs().mean() < 0.5 * (int8 - others).abs().mean()
    assert predict.main([str(path), *map(str, images), '--out', str(tmp_path / 'int8.jsonl')]) == 0
    rows = [model.class_names.index(json.loads(line)['classes'][0]) for line in open(tmp_path / 'int8.jsonl')]
    assert rows == int8.argmax(-1).tolist() and len(rows) == 9
    top2 = fp32.topk(2, dim=-1).values
    decisive = (top2[:, 0] - top2[:, 1]) > 2 * error
    assert all(r == f for r, f, d in zip(rows, fp32.argmax(-1).tolist(), decisive) if d)
    # dynamic from the fp32 graph of the same model: int8 weights, a quarter of their bytes
    fp32_graph, dynamic = tmp_path / 'fp32.onnx', tmp_path / 'dynamic.onnx'
    onnx_export.export_onnx(model, str(fp32_graph), 48, onnx_export.onnx_metadata(model, run_args, 'x'), optimize=False)
    info = quantize(str(fp32_graph), str(dynamic), 'dynamic', {'class_names': meta['class_names']})
    assert info['mode'] == 'dynamic' and dynamic.stat().st_size < 0.5 * fp32_graph.stat().st_size
    got = torch.from_numpy(onnx_export.onnx_runner(str(dynamic)).run(None, {'images': x.numpy()})[0])
    assert got.shape == fp32.shape and (got - fp32).abs().mean() < 0.5 * (got - fp32.roll(1, dims=0)).abs().mean()


def test_quantization_refuses_in_one_line_before_exporting(trained, tmp_path, capsys, monkeypatch):
    """No calibration images, a calibration folder with other classes, no onnxruntime, and an int8
    graph given to main.py --finetune: one error line each, nothing written."""
    data, out = trained
    target = tmp_path / 'int8.onnx'
    checkpoint = str(out / 'model_best.pth')
    other = make_image_folder(tmp_path / 'other', classes=('beach', 'desert', 'forest'))
    cases = [(['--quantize', 'static'], '--calibration DATA/train'),
             (['--quantize', 'static', '--calibration', str(other / 'train')], 'other classes'),
             (['--quantize', 'static', '--calibration', str(data / 'train'), '--calibration-images', '0'], 'at least 1')]
    for flags, words in cases:
        assert export.main(['onnx', checkpoint, str(target)] + flags) == 2
        err = capsys.readouterr().err
        assert err.startswith('error:') and err.count('\n') == 1 and words in err, err
        assert not target.exists()
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec',
                        lambda name, *a: None if name == 'onnxruntime' else real_find_spec(name, *a))
    assert export.main(['onnx', checkpoint, str(target), '--quantize', 'dynamic']) == 2
    err = capsys.readouterr().err
    assert 'INT8 quantization' in err and 'onnxruntime' in err and err.count('\n') == 1
    monkeypatch.undo()
    target.write_bytes(b'\x08\x07')  # what a graph file starts as
    assert entry.run([str(a) for a in ['--data-path', data, '--model', MODEL, '--finetune', target, '--epochs', '1',
                                       '--output_dir', tmp_path / 'run'] + FAST]) == 2
    err = capsys.readouterr().err
    assert 'ONNX graph' in err and err.count('\n') == 1
