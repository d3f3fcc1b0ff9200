"""The evaluation model as an ONNX graph (static token counts, dynamic batch), onnxruntime's
runner, and the parity check of the two. Needs the optional packages of requirements-export.txt."""
import importlib.util
import json
import os
from typing import Dict, Iterable, Optional

import torch

import models
from datasets import normalization
from utils import UserError, atomic_write


EXPORT_PACKAGES = ('onnx', 'onnxruntime', 'onnxscript')  # requirements-export.txt


def require_packages(purpose: str, packages=EXPORT_PACKAGES) -> None:
    """UserError naming the optional packages that `purpose` needs and that are not installed."""
    missing = [name for name in packages if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f'{purpose} needs the optional packages of requirements-export.txt ({", ".join(missing)} '
                        f'missing): pip install -r requirements-export.txt')


ONNX_OPSET = 18


PARITY_TOLERANCE = 1e-4  # largest |logit| difference between onnxruntime and PyTorch per image


OUTLIER_SHARE = 0.01  # share of images allowed beyond it (near-ties of the token selection)


def export_onnx(model: models.SDT2Net, path: str, input_size: int, metadata: Optional[Dict[str, str]] = None,
                optimize: bool = True) -> None:
    """Trace the evaluation model (its fixed schedule becomes static token counts) to ONNX with a
    dynamic batch dimension; `metadata` goes into the model's metadata_props. `optimize` runs
    onnxscript's graph optimiser (a quarter of the nodes; most of the export time)."""
    import onnx  # optional dependencies: requirements-export.txt
    model = model.eval()
    example = torch.zeros(2, 3, input_size, input_size)
    batch = torch.export.Dim('batch', min=1, max=4096)
    try:
        program = torch.onnx.export(model, (example,), dynamo=True, opset_version=ONNX_OPSET, verbose=False,
                                    optimize=optimize, input_names=['images'], output_names=['logits'],
                                    dynamic_shapes={'x': {0: batch}})
    except Exception as error:  # the exporter's own error types; their summary names the operation
        lines = str(error).strip().splitlines()
        cause = next((line for line in lines if line.startswith('<class')), lines[0] if lines else repr(error))
        raise UserError(f'ONNX export failed: {cause}') from None
    graph = program.model_proto
    for key, value in (metadata or {}).items():
        graph.metadata_props.add(key=key, value=value)
    atomic_write(lambda tmp: onnx.save_model(graph, tmp), path)


def onnx_runner(path: str, threads: int = 0, spin: bool = True):
    """onnxruntime's CPU runner of an ONNX file, quiet (it would note every node it cannot fold);
    threads: intra-op threads, 0 = onnxruntime's default; spin False: the pool's threads sleep
    between runs instead of spinning, for runners timed one after the other (a spinning pool
    takes the cores from the next runner: docs/benchmark.md, "Fewer nodes per compression")."""
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    if not spin:
        options.add_session_config_entry('session.intra_op.allow_spinning', '0')
    return onnxruntime.InferenceSession(path, options, providers=['CPUExecutionProvider'])


def compare_with_onnxruntime(model: models.SDT2Net, onnx_path: str, images: Iterable[torch.Tensor]) -> Dict[str, float]:
    """Run both on the same batches: per image, the largest logit difference against PyTorch
    running the graph's own operations (models.tracing) and against the eager model; top-1 agreement."""
    runner = onnx_runner(onnx_path)
    traced_diff, eager_diff, agree = [], [], []
    for batch in images:
        runtime = torch.from_numpy(runner.run(None, {'images': batch.numpy()})[0])
        with torch.no_grad():
            eager = model(batch)
            with models.export_numerics():
                traced = model(batch)
        traced_diff += (runtime - traced).abs().amax(dim=-1).tolist()
        eager_diff += (runtime - eager).abs().amax(dim=-1).tolist()
        agree += (runtime.argmax(-1) == eager.argmax(-1)).tolist()
    traced = torch.tensor(traced_diff)
    return {'images': len(agree), 'max_abs_diff_traced': traced.max().item(),
            'median_abs_diff_traced': traced.median().item(),
            'images_over_tolerance': int((traced > PARITY_TOLERANCE).sum()),
            'max_abs_diff_eager': max(eager_diff), 'top1_agreement': sum(agree) / len(agree)}


def onnx_metadata(model: models.SDT2Net, run_args, source: str) -> Dict[str, str]:
    """What a deployed graph carries besides its weights: class names, preprocessing (the run's
    input size, mean and std), schedule."""
    schedule = model.schedule()
    mean, std = normalization(run_args)
    return {
        'class_names': json.dumps(model.class_names),
        'input_size': str(run_args.input_size),
        'preprocessing': 'RGB, resize shorter side to input_size / 0.875 (bicubic), centre crop, '
                         'scale to [0, 1], normalise with mean/std',
        'mean': json.dumps(list(mean)),  # datasets.build_transform's
        'std': json.dumps(list(std)),
        'schedule': json.dumps({'prune': list(schedule.prune), 'merge': list(schedule.merge)}),
        'gflops': f'{float(model.flops()) / 1e9:.4f}',
        'source': os.path.abspath(source),
    }


class OnnxClassifier:
    """An exported graph in onnxruntime with what its metadata says: class names, input size and
    normalisation. Called on images [B, 3, H, W] (float32, CPU), it returns logits [B, classes]."""

    def __init__(self, path: str, threads: int = 0) -> None:
        import onnx
        try:
            graph = onnx.load(path, load_external_data=False)
            metadata = {p.key: p.value for p in graph.metadata_props}
            self.class_names = json.loads(metadata['class_names'])
            self.input_size = int(metadata['input_size'])
            self.mean, self.std = json.loads(metadata['mean']), json.loads(metadata['std'])
        except (KeyError, ValueError, TypeError) as error:
            raise UserError(f'{path} is not a graph written by export.py onnx (its metadata: {error!r})') from None
        except Exception as error:  # onnx's parser raises its own types
            raise UserError(f'cannot read {path} as an ONNX graph ({type(error).__name__})') from None
        try:
            self.runner = onnx_runner(path, threads)
        except Exception as error:  # onnxruntime's own error types
            raise UserError(f'onnxruntime cannot run {path} ({type(error).__name__})') from None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.runner.run(None, {'images': images.float().numpy()})[0])
