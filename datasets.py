"""Data: ImageFolder train/ + val/ splits with DeiT's timm transforms, an in-memory synthetic set,
and image files collected from paths, folders and lists for prediction and export checks."""
import os
import sys
from typing import Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import Dataset, Sampler
from torchvision import datasets as tv_datasets
from torchvision import transforms

from utils import UserError, get_rank, get_world_size, is_distributed

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')


class UnreadableImageError(Exception):
    """An image file that PIL cannot decode (raised inside data-loading workers)."""


def load_rgb(path: str) -> Image.Image:
    try:
        with open(path, 'rb') as f:
            return Image.open(f).convert('RGB')
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise UnreadableImageError(f'cannot read image {path}: {error}') from None


def list_classes(split_dir: str) -> List[str]:
    """Class folders of one split; every class must contain at least one image."""
    if not os.path.isdir(split_dir):
        raise UserError(f'missing split folder {split_dir} (expected DATA/train and DATA/val class folders)')
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith('.'))
    if not classes:
        raise UserError(f'no class folders in {split_dir}')
    empty = [c for c in classes
             if not any(f.lower().endswith(IMAGE_EXTENSIONS) for f in os.listdir(os.path.join(split_dir, c)))]
    if empty:
        raise UserError(f'class folders without images in {split_dir}: {", ".join(empty[:5])}')
    return classes


def train_dir(args) -> str:
    """The training ImageFolder: --train-path (e.g. a pretraining pool), else DATA/train."""
    return getattr(args, 'train_path', '') or os.path.join(args.data_path, 'train')


def check_class_folders(data_path: str, split: str, train_path: str) -> List[str]:
    """The class names; the training folder (`train_dir`) and the evaluation split must hold the
    same classes."""
    if not os.path.isdir(data_path):
        raise UserError(f'--data-path {data_path} is not a folder')
    train, other = list_classes(train_path), list_classes(os.path.join(data_path, split))
    if train != other:
        only_train, only_other = sorted(set(train) - set(other)), sorted(set(other) - set(train))
        raise UserError(f'{train_path} and {split}/ hold different classes (only in train: {only_train[:5]}, '
                        f'only in {split}: {only_other[:5]})')
    return train


def build_transform(is_train: bool, args) -> transforms.Compose:
    """DeiT's transforms: timm RandAugment / random erasing for training, resize + centre crop else;
    normalised with the run's mean and std."""
    mean, std = normalization(args)
    if is_train:
        return create_transform(
            input_size=args.input_size, is_training=True, color_jitter=args.color_jitter,
            auto_augment=args.aa if args.aa not in ('', 'none') else None,
            interpolation=args.train_interpolation, re_prob=args.reprob, re_mode=args.remode,
            re_count=args.recount, mean=mean, std=std)
    return eval_transform(args.input_size, mean, std)


def normalization(args) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """(mean, std) of a run (--mean/--std; runs that did not record them used ImageNet's)."""
    return (tuple(getattr(args, 'mean', None) or IMAGENET_DEFAULT_MEAN),
            tuple(getattr(args, 'std', None) or IMAGENET_DEFAULT_STD))


def eval_transform(input_size: int, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD) -> transforms.Compose:
    """Resize the shorter side to input_size / 0.875 (bicubic), centre crop, normalise."""
    resize = int(input_size / 0.875) if input_size >= 32 else input_size
    return transforms.Compose([
        transforms.Resize(resize, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(input_size),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


class SyntheticScenes(Dataset):
    """Images generated in memory with learnable class structure, for smoke runs and tests.

    Each class has a smooth random colour layout (an 4x4 grid upsampled to the image); a sample
    is its class layout, randomly flipped, with per-sample brightness and Gaussian noise.
    Deterministic: sample i of a split is the same in every process and every run.
    """

    def __init__(self, num_classes: int, num_samples: int, image_size: int, split_seed: int) -> None:
        self.num_classes, self.num_samples, self.image_size = num_classes, num_samples, image_size
        self.split_seed = split_seed
        generator = torch.Generator().manual_seed(1234)  # class layouts are shared by all splits
        layouts = torch.randn(num_classes, 3, 4, 4, generator=generator)
        self.layouts = F.interpolate(layouts, size=(image_size, image_size), mode='bilinear', align_corners=False)
        self.classes = [f'class_{i:02d}' for i in range(num_classes)]

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        generator = torch.Generator().manual_seed(self.split_seed * 1_000_003 + index)
        label = index % self.num_classes
        image = self.layouts[label] * (0.6 + 0.8 * torch.rand(1, generator=generator))
        if torch.rand(1, generator=generator) < 0.5:
            image = image.flip(-1)
        return image + 0.8 * torch.randn(image.shape, generator=generator), label


def build_dataset(is_train: bool, args, split: str = 'val') -> Tuple[Dataset, List[str]]:
    """(dataset, class names) of the training split, or of the evaluation split `split`."""
    if args.data_set == 'synthetic':
        size = args.synthetic_train_size if is_train else args.synthetic_val_size
        dataset = SyntheticScenes(args.synthetic_classes, size, args.input_size, split_seed=1 if is_train else 2)
        return dataset, dataset.classes
    classes = check_class_folders(args.data_path, split, train_dir(args))
    root = train_dir(args) if is_train else os.path.join(args.data_path, split)
    dataset = SceneFolder(root, transform=build_transform(is_train, args), loader=load_rgb,
                          is_valid_file=lambda p: p.lower().endswith(IMAGE_EXTENSIONS)
                          and not os.path.basename(p).startswith('.'))
    return dataset, classes


def check_images(dataset: Dataset, split: str) -> None:
    """Open every image of an ImageFolder split (header and integrity, no full decode) and list
    all the files that fail at once, before any work depends on them."""
    bad = []
    for path, _ in getattr(dataset, 'samples', []):
        try:
            with Image.open(path) as image:
                image.verify()
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
            bad.append(f'{path} ({str(error).splitlines()[0] if str(error) else type(error).__name__})')
    if bad:
        more = f' and {len(bad) - 10} more' if len(bad) > 10 else ''
        raise UserError(f'{len(bad)} unreadable image(s) in {split}/: {"; ".join(bad[:10])}{more}; '
                        f'remove or replace them')


class SceneFolder(tv_datasets.ImageFolder):
    """ImageFolder whose classes are list_classes' (hidden folders such as .ipynb_checkpoints are
    not classes)."""

    def find_classes(self, directory: str) -> Tuple[List[str], dict]:
        classes = list_classes(directory)
        return classes, {name: index for index, name in enumerate(classes)}


class ShardSampler(Sampler):
    """Evaluation sampler: process r takes indices r, r + W, ...; every image is counted once."""

    def __init__(self, dataset: Dataset) -> None:
        self.indices = list(range(get_rank(), len(dataset), get_world_size()))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class EpochShuffleSampler(Sampler):
    """Single-process training sampler whose order depends only on (seed, epoch): exact resume."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.size, self.seed, self.epoch = len(dataset), seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 10_007 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


def build_samplers(train_set: Optional[Dataset], val_set: Dataset, args) -> Tuple[Optional[Sampler], Sampler]:
    """Training sampler (RASampler when distributed with --repeated-aug) and evaluation sampler."""
    train_sampler = None
    if train_set is not None:
        if is_distributed() and args.repeated_aug:
            train_sampler = RepeatAugSampler(train_set, num_replicas=get_world_size(), rank=get_rank(),
                                             shuffle=True, selected_round=0)
        elif is_distributed():
            train_sampler = torch.utils.data.DistributedSampler(train_set, seed=args.seed, drop_last=True)
        else:
            train_sampler = EpochShuffleSampler(train_set, args.seed)
    val_sampler = ShardSampler(val_set) if is_distributed() and args.dist_eval else \
        torch.utils.data.SequentialSampler(val_set)
    return train_sampler, val_sampler


def collect_images(inputs: List[str]) -> List[str]:
    """Image paths of files, folders (recursive) and .txt lists, sorted, without duplicates."""
    paths = set()
    for item in inputs:
        if os.path.isdir(item):
            for root, dirs, files in os.walk(item):
                dirs[:] = [d for d in dirs if not d.startswith('.')]
                paths.update(os.path.join(root, f) for f in files
                             if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith('.'))
        elif item.lower().endswith('.txt') and os.path.isfile(item):
            with open(item) as f:
                paths.update(line.strip() for line in f if line.strip())
        elif os.path.isfile(item):
            paths.add(item)
        else:
            raise UserError(f'no such image, folder or list: {item}')
    if not paths:
        raise UserError(f'no images found in {", ".join(inputs)}')
    return sorted(paths)


def batches(paths: List[str], transform, batch_size: int) -> Iterator[Tuple[List[str], torch.Tensor]]:
    """(readable paths, images [b, 3, H, W]) per batch; unreadable files are reported and skipped."""
    names, images = [], []
    for path in paths:
        try:
            images.append(transform(load_rgb(path)))
            names.append(path)
        except UnreadableImageError as error:
            print(f'skipped: {error}', file=sys.stderr)
        if len(images) == batch_size:
            yield names, torch.stack(images)
            names, images = [], []
    if images:
        yield names, torch.stack(images)
