"""Paired comparison of two evaluations of the same images (the predictions.csv of main.py --eval).

    python compare.py RUN_A/eval/predictions.csv RUN_B/eval/predictions.csv [--json OUT.json]

Prints both top-1 accuracies, their difference A - B with a 95% confidence interval from a
paired bootstrap over images, and the exact McNemar test of the images on which they disagree.
"""
import argparse
import json
import sys

from utils import ArgumentParser, atomic_write_text, error_boundary
from workflow.stats import compare_files


@error_boundary
def main(argv=None) -> int:
    parser = ArgumentParser(prog='compare.py', description=__doc__.splitlines()[0],
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('a', help='predictions.csv of evaluation A')
    parser.add_argument('b', help='predictions.csv of evaluation B (same images)')
    parser.add_argument('--resamples', type=int, default=10000, help='bootstrap resamples')
    parser.add_argument('--json', default='', help='also write the result here')
    args = parser.parse_args(argv)
    if args.resamples < 100:
        parser.error(f'--resamples must be at least 100, got {args.resamples}')
    result = compare_files(args.a, args.b, args.resamples)
    print(f'{result["images"]} images: A {result["acc_a"]:.2f}%, B {result["acc_b"]:.2f}%, A - B '
          f'{result["difference"]:+.2f} points, 95% CI [{result["ci_low"]:+.2f}, {result["ci_high"]:+.2f}] '
          f'(paired bootstrap); only A right on {result["only_a_correct"]}, only B on '
          f'{result["only_b_correct"]}, McNemar p = {result["mcnemar_p"]:.3g}')
    if args.json:
        atomic_write_text(json.dumps(result, indent=1) + '\n', args.json)
    return 0


if __name__ == '__main__':
    sys.exit(main())
