"""Figures of a run, generated from its output folder (PNG files written into that folder).

    python visualize.py OUT                         # schedule, curves, confusion matrix (after --eval)
    python visualize.py OUT --data-path DATA        # + token groups of a few validation images
    python visualize.py OUT --compare OUT2 OUT3     # + accuracy against FLOPs over the runs
    python visualize.py --pipeline figures/         # the architecture figure of the README

A run folder holds args.json, log.txt, checkpoint.pth, compression_rate.json and, after an
evaluation with --output_dir OUT/eval, eval/eval_metrics.json.
"""
import argparse
import os
import sys

from utils import ArgumentParser, UserError, error_boundary, error_line
from workflow.figures import (plot_confusion, plot_curves, plot_pareto, plot_pipeline, plot_schedule,
                              plot_token_groups)


@error_boundary
def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('run', nargs='?', help='output folder of a run')
    parser.add_argument('--data-path', default='', help='dataset root (train/, val/) for the token-group figure')
    parser.add_argument('--compare', nargs='*', default=[], help='other evaluated runs for accuracy vs FLOPs')
    parser.add_argument('--pipeline', default='', help='write the architecture figure into this folder')
    parser.add_argument('--num-images', type=int, default=4, help='images in the token-group figure')
    args = parser.parse_args(argv)
    if not args.run and not args.pipeline:
        parser.error('give a run folder and/or --pipeline')
    if args.num_images < 1:
        parser.error(f'--num-images must be at least 1, got {args.num_images}')
    written = []
    if args.pipeline:
        written.append(plot_pipeline(args.pipeline))
    if args.run:
        if not os.path.isdir(args.run):
            raise UserError(f'{args.run} is not a folder')
        try:
            written += [plot_schedule(args.run), plot_curves(args.run)]
            if os.path.isfile(os.path.join(args.run, 'eval', 'eval_metrics.json')):
                written.append(plot_confusion(args.run))
            if args.compare:
                written.append(plot_pareto([args.run] + args.compare, args.run))
        except (KeyError, TypeError, ValueError, IndexError) as error:  # a log or evaluation of another shape
            raise UserError(f'{args.run}: its log.txt or eval/eval_metrics.json lacks what the figures need '
                            f'({type(error).__name__}: {error_line(error)})') from None
        if args.data_path:
            written.append(plot_token_groups(args.run, args.data_path, args.num_images))
    print('\n'.join(written))
    return 0


if __name__ == '__main__':
    sys.exit(main())
