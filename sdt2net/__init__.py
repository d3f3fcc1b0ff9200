"""SDT2Net library: the models (importing this package registers them with timm), data, the training
and evaluation loops, checkpoints and run folders, schedule files, statistics, figures, export and
timing. The command-line tools at the repository root are thin wrappers around it."""
from . import models

__all__ = ['models']
