# medEDM: diffusion-model training toolkit for medical imaging.

"""Run directories and training states.

A training state (`training-state-<kimg:06d>.pt`) holds only state_dicts,
tensors and numbers, so it loads with `torch.load(weights_only=True)`. Files
are written atomically; when resuming, a damaged newest state is skipped with a
warning naming it and the next older one is used."""

import atexit
import errno
import fcntl
import math
import os
import re
import socket
import time
import warnings
from typing import Any

import torch
import yaml

from torch_utils import persistence

#----------------------------------------------------------------------------

STATE_RE = re.compile(r'training-state-(\d{6,})\.pt')
SNAPSHOT_RE = re.compile(r'network-snapshot-(\d{6,})\.pkl')
RUN_DIR_RE = re.compile(r'(\d{5,})-(.+)')
STATE_KEYS = ('cur_nimg', 'cur_tick', 'net', 'ema', 'optimizer')

def state_path(run_dir: str, cur_nimg: int) -> str:
    return os.path.join(run_dir, f'training-state-{cur_nimg // 1000:06d}.pt')

def snapshot_path(run_dir: str, cur_nimg: int) -> str:
    return os.path.join(run_dir, f'network-snapshot-{cur_nimg // 1000:06d}.pkl')

#----------------------------------------------------------------------------
# Save and load.

def save_state(path: str, state: dict[str, Any]) -> None:
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise ValueError(f'training state lacks {missing}')
    persistence.atomic_torch_save(state, path)

def load_state(path: str) -> dict[str, Any]:
    """Load a training state with weights_only=True; ValueError naming the file if damaged."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'training state not found: {path}')
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err: # Truncated zip, foreign pickle, ...
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f'cannot load training state {path}: {msg}') from None
    if not isinstance(state, dict) or any(k not in state for k in STATE_KEYS):
        raise ValueError(f'cannot load training state {path}: not a medEDM training state (needs keys {list(STATE_KEYS)})')
    return state

def list_states(run_dir: str) -> list[str]:
    """Training-state files of a run directory, newest first."""
    if not os.path.isdir(run_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(run_dir) if (m := STATE_RE.fullmatch(name))]
    return [os.path.join(run_dir, name) for _, name in sorted(found, reverse=True)]

def find_latest_state(run_dir: str) -> str | None:
    """Newest training state of `run_dir` that loads; damaged ones are skipped with a warning."""
    for path in list_states(run_dir):
        try:
            load_state(path)
            return path
        except ValueError as err:
            warnings.warn(f'skipping damaged training state {path}: {err}', stacklevel=2)
    return None

def remove_stale_tmp(run_dir: str) -> None:
    """Delete leftovers of writes that a crash interrupted (`<name>.tmp<pid><10 random digits>`,
    see persistence.atomic_write). Only the holder of the run directory's lock may call it, and
    a file whose pid is a live process of this machine is kept: it may be another writer's.
    Takes the lock first (RunDirBusy naming the holder if another live run has it)."""
    lock_run_dir(run_dir)
    if os.path.isdir(run_dir):
        for name in os.listdir(run_dir):
            m = re.fullmatch(r'.+\.tmp(\d+)(\d{10})', name)
            if m and not _pid_alive(int(m.group(1))):
                try: os.remove(os.path.join(run_dir, name))
                except OSError: pass

def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False # This process writes nothing yet when it cleans up.
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True

#----------------------------------------------------------------------------
# A run directory is owned by one run at a time: `<run_dir>/.lock`, locked
# with fcntl.lockf (a POSIX record lock, honoured over NFS) and held open for
# the life of the process. The kernel drops it when its holder exits or is
# killed, so a dead run never blocks a restart; unlike flock, it is not
# inherited by forked DataLoader workers, which may outlive a killed parent.

LOCK_NAME = '.lock'
_held_locks: dict[str, Any] = {} # Real path of the run dir -> open lock file.
atexit.register(lambda: [f.close() for f in _held_locks.values()])

class RunDirBusy(ValueError):
    """Another live process holds the run directory."""

def try_lock(run_dir: str) -> str | None:
    """Lock `run_dir` for this process; None on success (or if already held here),
    else a description of the holder (`host ..., pid ..., since ...`)."""
    key = os.path.realpath(run_dir)
    if key in _held_locks:
        return None
    path = os.path.join(run_dir, LOCK_NAME)
    try:
        f = open(path, 'a+', encoding='utf-8')
    except OSError as err:
        raise ValueError(f'cannot lock the run directory {run_dir}: {err.strerror or err} ({path})') from None
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        f.close() # (Opened and closed once, before any lock of ours on it: safe for POSIX locks.)
        if err.errno not in (errno.EACCES, errno.EAGAIN):
            raise ValueError(f'cannot lock the run directory {run_dir}: {err.strerror or err} ({path})') from None
        try:
            with open(path, encoding='utf-8') as g:
                holder = g.read().strip()[:300]
        except OSError:
            holder = ''
        return holder or 'another process (holder unknown)'
    f.seek(0)
    f.truncate()
    f.write(f'host {socket.gethostname()}, pid {os.getpid()}, since {time.strftime("%Y-%m-%d %H:%M:%S")}\n')
    f.flush()
    _held_locks[key] = f
    return None

def lock_run_dir(run_dir: str) -> None:
    """Lock `run_dir` for the life of this process; RunDirBusy naming the holder if it is taken."""
    holder = try_lock(run_dir)
    if holder is not None:
        raise RunDirBusy(f'the run directory {run_dir} is in use by another run ({holder}); wait for it to end, '
            f'or start a new run with resume=auto or resume=none')

def unlock_run_dir(run_dir: str) -> None:
    f = _held_locks.pop(os.path.realpath(run_dir), None)
    if f is not None:
        f.close() # Closing drops the POSIX lock.

def holds_lock(run_dir: str) -> bool:
    return os.path.realpath(run_dir) in _held_locks

#----------------------------------------------------------------------------
# Run directories: <outdir>/<NNNNN>-<desc>.

def list_run_dirs(outdir: str) -> list[tuple[int, str, str]]:
    """(id, desc, path) of the run directories in outdir, by id."""
    if not os.path.isdir(outdir):
        return []
    runs = []
    for name in os.listdir(outdir):
        m = RUN_DIR_RE.fullmatch(name)
        if m and os.path.isdir(os.path.join(outdir, name)):
            runs.append((int(m.group(1)), m.group(2), os.path.join(outdir, name)))
    return sorted(runs)

def new_run_dir(outdir: str, desc: str) -> str:
    """Create <outdir>/<max id + 1:05d>-<desc>, lock it and return its path."""
    try:
        os.makedirs(outdir, exist_ok=True)
    except OSError as err:
        raise ValueError(f'training.outdir: cannot create {outdir}: {err.strerror or err}') from None
    while True:
        runs = list_run_dirs(outdir)
        run_id = max([r[0] for r in runs], default=-1) + 1
        path = os.path.join(outdir, f'{run_id:05d}-{desc}')
        try:
            os.makedirs(path)
        except FileExistsError: # Another launch took this id; try the next.
            continue
        except OSError as err:
            raise ValueError(f'training.outdir: cannot create a run directory in {outdir}: {err.strerror or err}') from None
        if try_lock(path) is None: # (Nobody else locks a directory without config.yaml; see find_auto_resume.)
            return path

KEEP_IN_EMPTY_RUN = ('config.yaml', 'log.txt', 'stats.jsonl', LOCK_NAME) # What an empty run directory may hold.

def is_empty_run(run_dir: str) -> bool:
    """True if `run_dir` holds nothing a run produced: no training states, snapshots,
    sample grids or other files (only config.yaml, log.txt, .lock, stats.jsonl)."""
    try:
        names = os.listdir(run_dir)
    except OSError:
        return False
    return all(name in KEEP_IN_EMPTY_RUN or re.fullmatch(r'.+\.tmp\d+', name) for name in names)

def remove_empty_run(run_dir: str) -> bool:
    """Remove a run directory this process created and locked if it is still empty
    (a run that failed before producing anything); True if removed."""
    if not holds_lock(run_dir) or not is_empty_run(run_dir) or any(re.fullmatch(r'.+\.tmp\d+', n) for n in os.listdir(run_dir)):
        return False
    for name in KEEP_IN_EMPTY_RUN:
        try: os.remove(os.path.join(run_dir, name))
        except FileNotFoundError: pass
    try:
        os.rmdir(run_dir)
    except OSError:
        return False
    unlock_run_dir(run_dir)
    return True

def find_auto_resume(outdir: str, desc: str, training_cfg: dict) -> tuple[str, str | None] | None:
    """For resume=auto: the newest run dir with this desc whose saved `training`
    config equals `training_cfg` and that no live run holds -> (run_dir, newest
    loadable state), locked for this process. A matching run that is empty (killed
    before its first state) is reused: (run_dir, None). None = start a new run."""
    for _, run_desc, path in reversed(list_run_dirs(outdir)):
        if run_desc != desc:
            continue
        cfg_path = os.path.join(path, 'config.yaml')
        if not os.path.isfile(cfg_path):
            continue
        try:
            with open(cfg_path, encoding='utf-8') as f:
                saved = yaml.safe_load(f)
        except (OSError, yaml.YAMLError):
            continue
        if not isinstance(saved, dict) or saved.get('training') != training_cfg:
            continue
        try:
            holder = try_lock(path)
        except ValueError: # Not lockable here (read-only, ...): not ours to continue.
            continue
        if holder is not None: # A live run: leave it alone.
            continue
        state = find_latest_state(path)
        if state is not None:
            return path, state
        if is_empty_run(path):
            return path, None
        unlock_run_dir(path)
        return None # The newest matching run has output but no state: start afresh.
    return None

#----------------------------------------------------------------------------
# Values of a loaded training state: a damaged or edited state is refused at
# resume, naming the file, before it can train.

MAX_NIMG = 2 ** 53 # Image counts beyond this are not exact in float64 kimg and beyond any real run.

def check_state_values(state: dict, path: str) -> None:
    """ValueError naming `path` unless the counters are sane and every weight is finite."""
    def count(key, least=0, most=MAX_NIMG):
        value = state.get(key)
        if value is None:
            return None
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
            value = int(value.item())
        if isinstance(value, bool) or not isinstance(value, int) or not least <= value <= most:
            raise ValueError(f'cannot resume from {path}: {key}={value!r} is not an integer in [{least}, {most}] (a damaged or edited state)')
        return value
    cur_nimg = count('cur_nimg')
    count('cur_tick')
    count('nonfinite_total')
    count('nonfinite_run')
    batch_size = count('batch_size', least=1)
    tick_start = count('tick_start_nimg', most=cur_nimg)
    if batch_size is not None and cur_nimg % batch_size != 0:
        raise ValueError(f'cannot resume from {path}: cur_nimg={cur_nimg} is not a multiple of its batch_size={batch_size} (a damaged or edited state)')
    if batch_size is not None and tick_start is not None and tick_start % batch_size != 0:
        raise ValueError(f'cannot resume from {path}: tick_start_nimg={tick_start} is not a multiple of its batch_size={batch_size} (a damaged or edited state)')
    elapsed = state.get('total_elapsed_time', 0)
    if not isinstance(elapsed, (int, float)) or isinstance(elapsed, bool) or not (math.isfinite(elapsed) and elapsed >= 0):
        raise ValueError(f'cannot resume from {path}: total_elapsed_time={elapsed!r} is not a finite number >= 0')
    for key in ('net', 'ema', 'loss_fn'):
        sd = state.get(key)
        if not isinstance(sd, dict):
            continue
        for name, tensor in sd.items():
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise ValueError(f'cannot resume from {path}: {key}.{name} has NaN or Inf values (a damaged state; resume from an older one)')

#----------------------------------------------------------------------------
