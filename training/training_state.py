# medEDM: diffusion-model training toolkit for medical imaging.

"""Run directories and training states.

A training state (`training-state-<kimg:06d>.pt`) holds only state_dicts,
tensors and numbers, so it loads with `torch.load(weights_only=True)`. Files
are written atomically; when resuming, a damaged newest state is skipped with a
warning naming it and the next older one is used."""

import os
import re
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
    """Delete leftovers of writes that a crash interrupted (`*.tmp<pid><random digits>`)."""
    if os.path.isdir(run_dir):
        for name in os.listdir(run_dir):
            if re.fullmatch(r'.+\.tmp\d+', name):
                try: os.remove(os.path.join(run_dir, name))
                except OSError: pass

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
    """Create <outdir>/<max id + 1:05d>-<desc> and return its path."""
    os.makedirs(outdir, exist_ok=True)
    while True:
        runs = list_run_dirs(outdir)
        run_id = max([r[0] for r in runs], default=-1) + 1
        path = os.path.join(outdir, f'{run_id:05d}-{desc}')
        try:
            os.makedirs(path)
            return path
        except FileExistsError: # Another launch took this id; try the next.
            continue

def find_auto_resume(outdir: str, desc: str, training_cfg: dict) -> tuple[str, str] | None:
    """For resume=auto: the newest run dir with this desc whose saved `training`
    config equals `training_cfg` and that holds a loadable training state
    -> (run_dir, state)."""
    for _, run_desc, path in reversed(list_run_dirs(outdir)):
        if run_desc != desc:
            continue
        cfg_path = os.path.join(path, 'config.yaml')
        if not os.path.isfile(cfg_path):
            continue
        with open(cfg_path, encoding='utf-8') as f:
            try: saved = yaml.safe_load(f)
            except yaml.YAMLError: continue
        if not isinstance(saved, dict) or saved.get('training') != training_cfg:
            continue
        state = find_latest_state(path)
        if state is not None:
            return path, state
        return None # The newest matching run has no state yet: start afresh.
    return None

#----------------------------------------------------------------------------
