"""Reading and writing compression_rate.json (ours and DiffRate's published format).

Layout: {model_name: {target_gflops: {"prune_kept_num": [...], "merge_kept_num": [...], ...}}}.
DiffRate stores the lists as strings ("[197,196,...]") and uses keys like "ViT-S-DeiT"; both load.
Extra fields (provenance: data, command, accuracy) are kept as they are.
"""
import json
import os
import re
from typing import Dict, List, Optional, Tuple

from utils import UserError, atomic_write_text

DEFAULT_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'compression_rate.json')

# DiffRate's keys for the DeiT models that our model names build.
DIFFRATE_KEYS = {
    'tiny': 'ViT-T-DeiT',
    'small': 'ViT-S-DeiT',
    'base': 'ViT-B-DeiT',
}


def diffrate_key(model_name: str) -> Optional[str]:
    for size, key in DIFFRATE_KEYS.items():
        if f'_{size}_' in model_name:
            return key
    return None


def _parse_counts(value) -> List[int]:
    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, list) or not all(isinstance(v, int) for v in value):
        raise ValueError(f'kept counts must be a list of integers, got {value!r}')
    return value


def read_file(path: str) -> Dict:
    if not os.path.isfile(path):
        raise UserError(f'compression-rate file not found: {path}')
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise UserError(f'{path} is not valid JSON: {error}') from None


def load_schedule(path: str, model_name: str, target_gflops: float) -> Tuple[List[int], List[int]]:
    """(prune, merge) kept counts for `model_name` at `target_gflops`; a clear error if absent."""
    table = read_file(path)
    keys = [k for k in (model_name, diffrate_key(model_name)) if k and k in table]
    for key in keys:
        for target, entry in table[key].items():
            try:
                matches = abs(float(target) - target_gflops) < 1e-6
            except ValueError:
                continue
            if matches:
                try:
                    return _parse_counts(entry['prune_kept_num']), _parse_counts(entry['merge_kept_num'])
                except (KeyError, ValueError) as error:
                    raise UserError(f'{path}: entry {key}/{target} is malformed: {error}') from None
    available = ', '.join(f'{k}: [{", ".join(table[k])}]' for k in table if isinstance(table[k], dict)) or 'nothing'
    raise UserError(f'{path} has no schedule for model {model_name} at target_flops {target_gflops}; '
                    f'it holds {available}')


def save_schedule(path: str, model_name: str, target_gflops: float, prune: List[int], merge: List[int],
                  **provenance) -> None:
    """Add or replace one entry, keeping every other entry of the file (atomic write)."""
    table = read_file(path) if os.path.isfile(path) else {}
    table.setdefault(model_name, {})[f'{target_gflops:g}'] = {
        'prune_kept_num': list(prune), 'merge_kept_num': list(merge), **provenance}
    text = json.dumps(table, indent=2)
    text = re.sub(r'\[\s+([-\d,\s]+?)\s+\]', lambda m: '[' + ' '.join(m.group(1).split()) + ']', text)
    atomic_write_text(text + '\n', path)


def uniform_schedule(model, target_gflops: float) -> Tuple[List[int], List[int]]:
    """A hand-set ToMe-style schedule: no pruning, the same number r of tokens merged in every
    block after the first, r chosen (bisection) so the model's FLOPs come closest to the target.
    The model's schedule is left fixed at the result."""
    depth, full = len(model.blocks), model.patch_embed.num_patches + 1

    def schedule(r: float) -> List[int]:
        return [full] + [max(2, round(full - r * block)) for block in range(1, depth)]

    def apply(r: float) -> Tuple[List[int], List[int]]:
        merge = schedule(r)
        prune = [full] + merge[:-1]  # nothing is pruned: each block starts from the last one's count
        model.set_kept_num(prune, merge)
        return prune, merge

    def gflops(r: float) -> float:
        apply(r)
        return float(model.flops().detach()) / 1e9

    low, high = 0.0, full / (depth - 1)
    if not gflops(high) <= target_gflops <= gflops(low):
        raise UserError(f'no uniform schedule reaches {target_gflops} GFLOPs '
                        f'(range [{gflops(high):.3f}, {gflops(low):.3f}])')
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (middle, high) if gflops(middle) > target_gflops else (low, middle)
    best = min((low, high), key=lambda r: abs(gflops(r) - target_gflops))
    return apply(best)
