"""Reading and writing compression_rate.json (ours and DiffRate's published format).

Layout: {model_name: {target_flops: {"prune_kept_num": [...], "merge_kept_num": [...], ...}}}.
DiffRate stores the lists as strings ("[197,196,...]") and uses keys like "ViT-S-DeiT"; both load.
Extra fields (provenance: data, command, accuracy) are kept as they are.
"""
import json
import os
import re
from typing import Dict, List, Optional

from models.schedule import Schedule
from utils import UserError, atomic_write_text, read_json

# the schedules shipped with the repository, at its root
DEFAULT_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'compression_rate.json')

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
    if isinstance(value, str):  # DiffRate's layout: the list as a string
        try:
            value = json.loads(value)
        except ValueError:
            raise ValueError(f'kept counts must be a list of integers, got {value!r}') from None
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f'kept counts must be a list of integers, got {value!r}')
    return value


def read_file(path: str) -> Dict:
    """The table of a compression_rate.json; UserError if it is missing, unreadable or not a table."""
    if not os.path.isfile(path):
        raise UserError(f'compression-rate file not found: {path}')
    return read_json(path)


def load_schedule(path: str, model_name: str, target_flops: float) -> Schedule:
    """The schedule of `model_name` at `target_flops` GFLOPs; a clear error if absent or malformed.

    Entries under DiffRate's keys are read as DiffRate's runtime reads them (a running minimum:
    its published lists sometimes keep more tokens in a block than the previous one passes on);
    entries under our model names must already be consistent (validated when fixed).
    """
    table = read_file(path)
    keys = [k for k in (model_name, diffrate_key(model_name)) if k and isinstance(table.get(k), dict)]
    for key in keys:
        for target, entry in table[key].items():
            try:
                matches = abs(float(target) - target_flops) < 1e-6
            except ValueError:
                continue
            if matches:
                try:
                    if not isinstance(entry, dict):
                        raise ValueError(f'an entry must be an object, got {entry!r}')
                    schedule = Schedule(_parse_counts(entry['prune_kept_num']), _parse_counts(entry['merge_kept_num']))
                except (KeyError, ValueError) as error:
                    raise UserError(f'{path}: entry {key}/{target} is malformed: {error}') from None
                return schedule.running_min() if key in DIFFRATE_KEYS.values() else schedule
    available = ', '.join(f'{k}: [{", ".join(table[k])}]' for k in table if isinstance(table[k], dict)) or 'nothing'
    raise UserError(f'{path} has no schedule for model {model_name} at target_flops {target_flops}; '
                    f'it holds {available}')


def save_schedule(path: str, model_name: str, key_flops: float, schedule: Schedule, **provenance) -> None:
    """Add or replace the entry under `key_flops` GFLOPs, keeping every other entry of the file
    (atomic write)."""
    table = read_file(path) if os.path.isfile(path) else {}
    table.setdefault(model_name, {})[f'{key_flops:g}'] = {**schedule.as_dict(), **provenance}
    text = json.dumps(table, indent=2)
    text = re.sub(r'\[\s+([-\d,\s]+?)\s+\]', lambda m: '[' + ' '.join(m.group(1).split()) + ']', text)
    atomic_write_text(text + '\n', path)
