"""Errors for users, distributed helpers, RNG state, atomic file writes and JSON reads, logging with ETA."""
import argparse
import datetime
import functools
import json
import os
import random
import sys
import time
from collections import defaultdict, deque
from typing import Any, Callable, Dict, Iterable, Optional

import numpy as np
import torch
import torch.distributed as dist


class UserError(Exception):
    """A problem with the user's input: reported as one line, exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose bad-argument report is one `error:` line (exit status 2), not usage + message."""

    def error(self, message: str) -> None:
        self.exit(2, f'error: {message} (--help lists the options)\n')


def error_line(error: BaseException) -> str:
    """One line describing `error`, whatever its message holds (empty, several lines, arguments
    that are not strings, a __str__ that raises): formatting an error never raises itself."""
    try:
        if isinstance(error, OSError) and error.strerror:
            where = error.filename if error.filename is not None else 'file system'
            text = f'{where}: {error.strerror}'
        else:
            text = str(error)
    except Exception:  # a broken __str__ or filename
        text = ''
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return '; '.join(lines) if lines else type(error).__name__


def error_boundary(main: Callable[..., Optional[int]]) -> Callable[..., int]:
    """The top-level error boundary of an entry point: a failure ends as one `error:` line and an
    exit status (2: bad input or a file problem, 1: out of memory or an unexpected error, 130:
    interrupted) instead of a traceback. Files are written atomically, so nothing already written
    is damaged. SDT2NET_TRACEBACK=1 re-raises unexpected errors with their traceback."""
    @functools.wraps(main)
    def bounded(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except UserError as error:
            message, status = error_line(error), 2
        except OSError as error:
            message, status = error_line(error), 2
        except torch.OutOfMemoryError:
            message, status = 'out of memory; use a smaller batch size', 1
        except KeyboardInterrupt:
            message, status = 'interrupted; files already written are complete (written atomically)', 130
        except Exception as error:  # a case no check foresaw: still one line, never a traceback dump
            if os.environ.get('SDT2NET_TRACEBACK'):
                raise
            message = f'unexpected {type(error).__name__}: {error_line(error)} (SDT2NET_TRACEBACK=1 shows where)'
            status = 1
        print(f'error: {message}', file=sys.stderr)
        return status
    return bounded


class NonFiniteError(Exception):
    """The loss or the compression rates became NaN or infinite: the run stops, earlier
    checkpoints are kept."""


class ReplicasDisagreeError(Exception):
    """Processes of one run hold different values of what DDP should keep identical."""


# --- distributed ------------------------------------------------------------------------------
def init_distributed(device_arg: Optional[str]) -> torch.device:
    """Join the torchrun process group if launched by torchrun; return this process's device."""
    device_type = device_arg or ('cuda' if torch.cuda.is_available() else 'cpu')
    if device_type.startswith('cuda') and not torch.cuda.is_available():
        raise UserError(f'--device {device_type} requested but CUDA is not available')
    if 'RANK' in os.environ and 'WORLD_SIZE' in os.environ:
        local_rank = int(os.environ.get('LOCAL_RANK', 0))
        if device_type.startswith('cuda'):
            torch.cuda.set_device(local_rank)
            device = torch.device('cuda', local_rank)
        else:
            device = torch.device(device_type)
        dist.init_process_group(backend='nccl' if device.type == 'cuda' else 'gloo')
        dist.barrier()
        return device
    return torch.device(device_type)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over processes (in place); a no-op in a single process."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


def check_replicas_agree(tensor: torch.Tensor, what: str) -> None:
    """Raise ReplicasDisagreeError unless every process holds the same `tensor` (bit for bit).

    DDP starts every process from rank 0's parameters and averages gradients, so replicas stay
    identical as long as every step does the same on every process; this checks that they did.
    """
    if not is_distributed():
        return
    gathered = [torch.empty_like(tensor) for _ in range(get_world_size())]
    dist.all_gather(gathered, tensor.detach().contiguous())
    differing = [rank for rank, value in enumerate(gathered) if not torch.equal(value, gathered[0])]
    if differing:
        raise ReplicasDisagreeError(f'the {what} of process(es) {differing} differ from those of process 0')


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DistributedDataParallel (or the model itself)."""
    return model.module if hasattr(model, 'module') else model


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch; each process gets seed + rank."""
    seed = seed + get_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --- RNG state as plain data (checkpoints load with weights_only=True) ---------------------------
def rng_state() -> Dict[str, Any]:
    np_state, py_state = np.random.get_state(), random.getstate()
    state = {
        'python': [py_state[0], list(py_state[1]), py_state[2]],
        'numpy': [np_state[0], torch.from_numpy(np_state[1].copy()), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((name, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


# --- files ------------------------------------------------------------------------------------
def atomic_write(write, path: str) -> None:
    """write(tmp) then rename over `path`: a crash never leaves a half-written file, and a failed
    write (a full disk) removes its temporary file and leaves `path` as it was."""
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_torch_save(obj: Any, path: str) -> None:
    atomic_write(lambda tmp: torch.save(obj, tmp), path)


def atomic_write_text(text: str, path: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, 'w') as f:
            f.write(text)
    atomic_write(write, path)


def append_json_line(record: Dict[str, Any], path: str) -> None:
    with open(path, 'a') as f:
        f.write(json.dumps(record) + '\n')

def read_json(path: str) -> Dict:
    """A JSON object from a file; UserError if the file is missing, unreadable or not an object."""
    if not os.path.isfile(path):
        raise UserError(f'missing {path}')
    try:
        with open(path, 'rb') as f:
            value = json.loads(f.read().decode('utf-8'))
    except (UnicodeDecodeError, ValueError) as error:
        raise UserError(f'{path} is not valid JSON ({error_line(error)})') from None
    if not isinstance(value, dict):
        raise UserError(f'{path} does not hold a JSON object')
    return value


# --- logging ----------------------------------------------------------------------------------
class SmoothedValue:
    """Running statistics of a scalar over a window and over the epoch."""

    def __init__(self, window: int = 20) -> None:
        self.values: deque = deque(maxlen=window)
        self.total, self.count = 0.0, 0

    def update(self, value: float, n: int = 1) -> None:
        self.values.append(value)
        self.total += value * n
        self.count += n

    @property
    def median(self) -> float:
        return float(np.median(self.values)) if self.values else 0.0

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)


class MetricLogger:
    """Iterates a loader and prints progress with ETA every `print_freq` steps (main process)."""

    def __init__(self, header: str, print_freq: int = 20) -> None:
        self.header = header
        self.print_freq = print_freq
        self.meters: Dict[str, SmoothedValue] = defaultdict(SmoothedValue)

    def update(self, n: int = 1, **values: float) -> None:
        for name, value in values.items():
            self.meters[name].update(float(value), n)

    def averages(self) -> Dict[str, float]:
        return {name: meter.global_avg for name, meter in self.meters.items()}

    def log_every(self, iterable: Iterable, total: int) -> Iterable:
        start = time.time()
        step_time = SmoothedValue()
        last = time.time()
        for i, item in enumerate(iterable):
            yield item
            step_time.update(time.time() - last)
            last = time.time()
            if is_main_process() and (i % self.print_freq == 0 or i == total - 1):
                eta = datetime.timedelta(seconds=int(step_time.median * (total - i - 1)))
                meters = '  '.join(f'{k}: {v.median:.4g} ({v.global_avg:.4g})' for k, v in self.meters.items())
                print(f'{self.header} [{i + 1}/{total}]  eta: {eta}  {meters}  time: {step_time.median:.3f}s',
                      flush=True)
        if is_main_process():
            elapsed = datetime.timedelta(seconds=int(time.time() - start))
            print(f'{self.header} done in {elapsed}', flush=True)
