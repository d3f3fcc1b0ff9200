"""Run main.py on several processes of this machine (what torchrun does on one node), with one
`error:` line when a process fails.

    python launch.py --nproc 2 main.py --device cpu --data-path DATA ...
    python launch.py --nproc 8 main.py --data-path DATA ...      # one process per GPU, nccl

Rank 0 prints to the console as a single process would; every process's output is also kept in
--log-dir (rank N: rankN.out / rankN.err). When a process fails, the others are stopped, and the
launcher prints the `error:` line of the first one that failed (its traceback, if any, stays in its
.err file) and exits with its status. torchrun's own launcher works too, but adds its report
and a traceback to every failure; use it for several machines.
"""
import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import List, Optional, Tuple

from utils import ArgumentParser, error_boundary


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it), for the rendezvous of the processes."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def error_line(path: str) -> Optional[str]:
    """The last `error:` line a process wrote to its stderr file, if any."""
    try:
        with open(path, errors='replace') as f:
            lines = [line.rstrip('\n') for line in f if line.startswith('error:')]
    except OSError:
        return None
    return lines[-1] if lines else None


def launch(nproc: int, command: List[str], log_dir: str) -> Tuple[int, Optional[int]]:
    """Start `command` as ranks 0..nproc-1 and wait; (exit status, rank that failed first or None)."""
    port = str(free_port())
    processes, files = [], []
    for rank in range(nproc):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                   LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR='127.0.0.1', MASTER_PORT=port)
        stdout = open(os.path.join(log_dir, f'rank{rank}.out'), 'w')
        stderr = open(os.path.join(log_dir, f'rank{rank}.err'), 'w')
        files += [stdout, stderr]
        # rank 0's stdout is the console; the file keeps the other ranks' (main.py silences them anyway)
        processes.append(subprocess.Popen([sys.executable, *command], env=env, stderr=stderr,
                                          stdout=None if rank == 0 else stdout))
    try:
        while True:
            codes = [p.poll() for p in processes]
            failed = [rank for rank, code in enumerate(codes) if code not in (None, 0)]
            if failed:  # the others would wait for it in their next collective: stop them
                for p in processes:
                    if p.poll() is None:
                        p.terminate()
                for p in processes:
                    p.wait()
                return codes[failed[0]], failed[0]
            if all(code == 0 for code in codes):
                return 0, None
            time.sleep(0.2)
    except KeyboardInterrupt:  # Ctrl-C reached the whole process group: let them write their reports
        for p in processes:
            p.wait()
        return 130, 0
    finally:
        for f in files:
            f.close()


@error_boundary
def main(argv=None) -> int:
    parser = ArgumentParser(prog='launch.py', description=__doc__.splitlines()[0])
    parser.add_argument('--nproc', type=int, required=True, help='processes to start (one per GPU)')
    parser.add_argument('--log-dir', default='', help='where every process writes its output (default: a new '
                                                      'temporary folder, named on failure)')
    parser.add_argument('command', nargs=argparse.REMAINDER, help='main.py and its arguments, passed on as they are')
    args = parser.parse_args(argv)
    command = args.command
    if not command:
        parser.error('give the script to run and its arguments, e.g. main.py --data-path DATA ...')
    if args.nproc < 1:
        parser.error(f'--nproc must be at least 1, got {args.nproc}')
    if not os.path.isfile(command[0]):
        parser.error(f'no such script: {command[0]}')
    log_dir = args.log_dir or tempfile.mkdtemp(prefix='sdt2net-launch-')
    os.makedirs(log_dir, exist_ok=True)
    status, rank = launch(args.nproc, command, log_dir)
    if rank is None:
        return 0
    line = error_line(os.path.join(log_dir, f'rank{rank}.err'))
    if line is None:  # a crash: name where its traceback is
        line = f'error: process {rank} of {args.nproc} exited with status {status}; its output is in {log_dir}'
    elif rank != 0:
        line = f'error: process {rank} of {args.nproc}: {line[len("error:"):].strip()}'
    print(line, file=sys.stderr)
    return status if status > 0 else 1


if __name__ == '__main__':
    sys.exit(main())
