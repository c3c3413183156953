# medEDM: diffusion-model training toolkit for medical imaging.

"""Process-group set-up from torchrun's environment, device choice, rank-0
printing and a clean shutdown. The same code runs on CPU (gloo) and GPU (nccl,
one device per local rank); a plain `python train.py` is a world of one."""

import datetime
import errno
import os
import re
import sys

import torch
import torch.distributed

#----------------------------------------------------------------------------
# Initialize from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
# MASTER_ADDR, MASTER_PORT). Without them, run as a single process.

_device = None
_timeout_sec = None # Of the process group, for the message when a collective times out.

def init(timeout_sec: float = 1800) -> None:
    """Start the process group; gloo on CPU, nccl when CUDA is available."""
    global _device, _timeout_sec
    if torch.distributed.is_initialized():
        return
    _timeout_sec = timeout_sec
    if 'WORLD_SIZE' not in os.environ: # Plain `python train.py`: a world of one.
        os.environ.setdefault('RANK', '0')
        os.environ.setdefault('LOCAL_RANK', '0')
        os.environ['WORLD_SIZE'] = '1'
        os.environ.setdefault('MASTER_ADDR', '127.0.0.1')
        os.environ.setdefault('MASTER_PORT', str(_free_port()))
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    if torch.cuda.is_available():
        _device = torch.device('cuda', local_rank % torch.cuda.device_count())
        torch.cuda.set_device(_device)
        backend = 'nccl'
    else:
        _device = torch.device('cpu')
        backend = 'gloo'
    torch.distributed.init_process_group(backend=backend, init_method='env://',
        timeout=datetime.timedelta(seconds=timeout_sec),
        device_id=(_device if backend == 'nccl' else None))

def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]

#----------------------------------------------------------------------------

def get_rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0

def get_world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1

def get_device() -> torch.device:
    """The device of this rank: cuda:<local_rank> when CUDA exists, else cpu."""
    if _device is not None:
        return _device
    if torch.cuda.is_available():
        return torch.device('cuda', int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count())
    return torch.device('cpu')

def barrier() -> None:
    if torch.distributed.is_initialized() and get_world_size() > 1:
        torch.distributed.barrier()

def print0(*args, **kwargs) -> None:
    if get_rank() == 0:
        print(*args, **kwargs)

def broadcast_object(obj, src: int = 0):
    """Send a picklable object from rank `src` to every rank (trusted peers only)."""
    if get_world_size() == 1:
        return obj
    buf = [obj]
    torch.distributed.broadcast_object_list(buf, src=src)
    return buf[0]

def all_reduce_min(value: float) -> float:
    """Smallest value over all ranks (every rank gets the same answer)."""
    if get_world_size() == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=get_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return float(t.item())

#----------------------------------------------------------------------------
# Run an entry point: user errors (bad config, files, values), a full disk and
# a collective that timed out (another rank hung or died) print one line
# `error: ...` on stderr per rank and exit 1 without a traceback; then a clean
# shutdown. Under torchrun, the agent then reports only the exit code.

_TIMEOUT_RE = re.compile(r'timed? ?out|timeout', re.IGNORECASE)

def is_collective_timeout(err: BaseException) -> bool:
    """A torch.distributed error that says a collective or the store timed out."""
    dist_errors = tuple(e for e in (getattr(torch.distributed, 'DistError', None), RuntimeError) if e is not None)
    return isinstance(err, dist_errors) and bool(_TIMEOUT_RE.search(str(err)))

_PEER_LOST_RE = re.compile(r'connection (closed|reset) by peer|broken pipe', re.IGNORECASE)

def is_peer_lost(err: BaseException) -> bool:
    """A torch.distributed error that says another rank's connection went away (it exited)."""
    return isinstance(err, RuntimeError) and bool(_PEER_LOST_RE.search(str(err)))

def run_and_exit(fn, *args, user_errors: tuple = (ValueError, FileNotFoundError)) -> None:
    try:
        fn(*args)
    except user_errors as err:
        _fail(f'error: {err}')
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        _fail(f'error: {err.strerror or err}')
    except Exception as err:
        if get_world_size() > 1 and is_collective_timeout(err):
            _fail(f'error: a collective operation timed out after training.timeout_sec={_timeout_sec:g} s: another process '
                f'stopped responding (hung, killed or much slower); if a step legitimately takes longer, raise training.timeout_sec')
        if get_world_size() > 1 and is_peer_lost(err):
            _fail('error: another process of this run exited (see its message); stopping')
        raise
    shutdown(0)

def fail_together(err: Exception | None) -> None:
    """Collective (every rank calls it at the same point): if any rank has an error,
    each rank with one prints its line, all wait until every rank has printed (so
    torchrun, which stops the others when one exits, cuts no line off) and exit 1."""
    if err is not None:
        _print_error(f'error: {err}')
    failed = err is not None
    if get_world_size() > 1:
        t = torch.tensor([float(failed)], dtype=torch.float64, device=get_device())
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        failed = bool(t.item())
    if failed:
        shutdown(1)

def _print_error(message: str) -> None:
    rank, world_size = (get_rank(), get_world_size()) if torch.distributed.is_initialized() else \
        (int(os.environ.get('RANK', '0')), int(os.environ.get('WORLD_SIZE', '1'))) # Failed before init: torchrun's numbers.
    prefix = f'[rank {rank}] ' if world_size > 1 else ''
    line = f'{prefix}{message}\n'
    try: # One write per line: ranks sharing a pipe do not interleave within lines.
        os.write(sys.stderr.fileno(), line.encode('utf-8', 'replace'))
    except (OSError, ValueError, AttributeError): # No real file descriptor (a test's capture, a closed stream).
        print(line, end='', file=sys.stderr, flush=True)

def _fail(message: str) -> None:
    _print_error(message)
    shutdown(1)

#----------------------------------------------------------------------------
# Clean shutdown. DDP on gloo sometimes aborts at interpreter exit after all
# work is done (SIGABRT, "terminate called without an active exception"), so
# every rank ends with barrier -> destroy_process_group -> flush -> os._exit.

def shutdown(exit_code: int = 0) -> None:
    """Leave the process group and exit the process with `exit_code`."""
    if torch.distributed.is_initialized():
        if exit_code == 0:
            try: barrier()
            except Exception: pass
        try: torch.distributed.destroy_process_group()
        except Exception: pass
    for stream in (sys.stdout, sys.stderr):
        try: stream.flush()
        except Exception: pass
    os._exit(exit_code)

#----------------------------------------------------------------------------
