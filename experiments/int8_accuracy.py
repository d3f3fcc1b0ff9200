"""What 8-bit integers cost in accuracy on top of token compression: the compressed model in fp32
(eager PyTorch), its int8 graphs (export.py onnx --quantize) in onnxruntime, and the dense fp32
model, scored on the same images; every int8 graph minus its fp32 model and minus the dense fp32
model, and the compressed fp32 model minus the dense one, as paired differences with 95% intervals.

    python -m experiments.int8_accuracy --data-path DATA --split test --dense DENSE.pth \
        --compressed TUNED.pth --int8 dynamic=int8_dynamic.onnx static=int8_static.onnx --out int8.json
"""
import json
import sys

from datasets import build_transform
from utils import ArgumentParser, UserError, atomic_write_text, error_boundary
from workflow.onnx_export import OnnxClassifier
from workflow.runs import load_trained_model
from workflow.stats import correct_on_split, difference_text, paired_differences


@error_boundary
def main(argv=None) -> int:
    parser = ArgumentParser(prog='int8_accuracy.py', description=__doc__.splitlines()[0])
    parser.add_argument('--data-path', required=True, help='ImageFolder root with the split below')
    parser.add_argument('--split', default='test')
    parser.add_argument('--dense', required=True, help='the dense fp32 checkpoint')
    parser.add_argument('--compressed', required=True, help='the compressed fp32 checkpoint the graphs come from')
    parser.add_argument('--int8', nargs='+', required=True, metavar='NAME=GRAPH', help='int8 graphs by name')
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--out', default='', help='also write the results here (JSON)')
    args = parser.parse_args(argv)
    graphs = dict(item.split('=', 1) for item in args.int8 if '=' in item)
    if len(graphs) != len(args.int8):
        raise UserError('--int8 takes NAME=GRAPH pairs, e.g. dynamic=model_int8.onnx')
    compressed, run_args = load_trained_model(args.compressed)
    classifiers = {'dense fp32': load_trained_model(args.dense)[0], 'compressed fp32': compressed}
    classifiers.update({f'compressed int8 {name}': OnnxClassifier(path) for name, path in graphs.items()})
    split, transform = f'{args.data_path}/{args.split}', build_transform(False, run_args)
    correct, files = {}, {}
    for name, classify in classifiers.items():
        files[name], correct[name] = correct_on_split(classify, split, compressed.class_names, transform,
                                                      args.batch_size)
        print(f'{name}: top-1 {100 * correct[name].mean():.2f}% on {len(files[name])} images of {args.split}/')
    if len(set(map(tuple, files.values()))) != 1:
        raise UserError('the models did not read the same images (an unreadable file?)')
    results = {'top1': {name: 100 * c.mean() for name, c in correct.items()}}
    pairs = [('compressed fp32', 'dense fp32')] + [(f'compressed int8 {name}', reference) for name in graphs
                                                    for reference in ('compressed fp32', 'dense fp32')]
    differences = paired_differences(correct, pairs)
    results.update(differences)
    for key, result in differences.items():
        print(f'{key}: {difference_text(result)}')
    if args.out:
        atomic_write_text(json.dumps(results, indent=1) + '\n', args.out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
