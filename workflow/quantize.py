"""8-bit integer versions of an exported graph, with onnxruntime's quantization tools.

dynamic: the weights of the matrix products and convolutions in int8 (per output channel), the
activations quantized at run time, batch by batch (no data needed).
static: weights and activations in int8 with fixed scales calibrated on images of the run's own
data (QDQ format: activations uint8, weights int8 per channel, as onnxruntime recommends for x86).

Only matrix products and convolutions are quantized (QUANTIZED_OPS): in the file, softmax, layer
norm, the token sort, gathers and the second-order head's root stay in float (at run time
onnxruntime fuses a softmax that sits between two quantized products of a static graph into its
QLinearSoftmax). docs/benchmark.md ("INT8") has the measurements. The graph's metadata keeps
everything export.py wrote and adds a `quantization` entry saying how.
"""
import json
import os
import random
import tempfile
from typing import Dict, Iterable, List, Optional

import numpy as np
import torch

from datasets import collect_images, list_classes
from utils import UserError, atomic_write

QUANTIZATIONS = ('dynamic', 'static')
QUANTIZED_OPS = ['MatMul', 'Gemm', 'Conv']


def calibration_images(folder: str, class_names: List[str], count: int, seed: int = 0) -> List[str]:
    """`count` image paths drawn (seeded) from an ImageFolder split whose class folders are the
    model's classes; UserError for a folder with other classes or without images."""
    if count < 1:
        raise UserError(f'--calibration-images must be at least 1, got {count}')
    classes = list_classes(folder)
    if classes != list(class_names):
        only_here, only_model = sorted(set(classes) - set(class_names)), sorted(set(class_names) - set(classes))
        raise UserError(f'--calibration {folder} holds other classes than the model (only in the folder: '
                        f'{only_here[:5]}, only in the model: {only_model[:5]}): calibrate on the run\'s own data')
    paths = collect_images([folder])
    return sorted(random.Random(seed).sample(paths, min(count, len(paths))))


class _BatchReader:
    """onnxruntime's CalibrationDataReader protocol over image batches [b, 3, H, W]; counts them."""

    def __init__(self, batches: Iterable[torch.Tensor]) -> None:
        self._batches, self.images = iter(batches), 0

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        images = next(self._batches, None)
        if images is None:
            return None
        self.images += images.shape[0]
        return {'images': images.float().numpy()}


def quantize(fp32_path: str, out_path: str, mode: str, metadata: Dict[str, str],
             calibration: Optional[Iterable[torch.Tensor]] = None) -> Dict[str, object]:
    """Write the int8 graph of `fp32_path` to `out_path` (atomically) with `metadata`; returns what
    goes into its `quantization` entry. calibration: preprocessed image batches (static only)."""
    import onnx
    import onnxruntime
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    if mode not in QUANTIZATIONS:
        raise UserError(f'--quantize must be one of {", ".join(QUANTIZATIONS)}, got {mode!r}')
    if mode == 'static' and calibration is None:
        raise UserError('--quantize static needs calibration images: --calibration DATA/train')
    info: Dict[str, object] = {'mode': mode, 'tool': 'onnxruntime.quantization', 'ops': QUANTIZED_OPS,
                               'weights': 'int8 per channel', 'float': 'every other operator'}
    onnxruntime.set_default_logger_severity(3)  # its optimiser notes every node it cannot fold
    with tempfile.TemporaryDirectory() as folder:
        prepared, quantized = os.path.join(folder, 'prepared.onnx'), os.path.join(folder, 'int8.onnx')
        # shape inference and graph optimisation first, as onnxruntime's tools advise
        quant_pre_process(fp32_path, prepared, skip_symbolic_shape=True)
        if mode == 'dynamic':
            quantize_dynamic(prepared, quantized, op_types_to_quantize=QUANTIZED_OPS, per_channel=True,
                             weight_type=QuantType.QInt8)
            info['activations'] = 'uint8, scales per batch at run time'
        else:
            reader = _BatchReader(calibration)
            quantize_static(prepared, quantized, reader, quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=QUANTIZED_OPS, per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
            info.update(activations='uint8, scales calibrated (min-max)', calibration_images=reader.images)
        graph = onnx.load(quantized)
    del graph.metadata_props[:]
    for key, value in dict(metadata, quantization=json.dumps(info)).items():
        graph.metadata_props.add(key=key, value=value)
    atomic_write(lambda tmp: onnx.save_model(graph, tmp), out_path)
    return info
