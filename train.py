# medEDM: diffusion-model training toolkit for medical imaging.

"""Train a diffusion model.

Examples:

\b
# One process (CPU or one GPU):
python train.py -cn=edm_mri

\b
# N processes on one machine (gloo on CPU, nccl on GPUs, chosen automatically):
torchrun --standalone --nproc_per_node=N train.py -cn=edm_mri training.batch_size=64

\b
# Two machines, 8 GPUs each (run on both; HOST is node 0's address):
torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
    --rdzv-id=myjob train.py -cn=edm_mri

Resume: `resume=auto` (default) continues the newest run of the same
description and configuration in training.outdir; `resume=<run dir>` continues
that run; `resume=<training-state file>` starts a new run from that state;
`resume=none` always starts afresh.

A run directory belongs to one run at a time (`<run dir>/.lock`, dropped by
the kernel when its holder exits or is killed): `resume=<run dir>` of a live
run is refused naming its host and pid, and `resume=auto` leaves live runs
alone and reuses an empty run directory of the same configuration. Config
errors are found before a run directory is made.
"""

import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from torch_utils import distributed as dist
from torch_utils import misc
from torch_utils import persistence
from training import config as config_mod
from training import sampling
from training import training_state

config_mod.register()

#----------------------------------------------------------------------------
# Tee stdout/stderr into <run_dir>/log.txt (rank 0).

class Logger:
    def __init__(self, file_name: str):
        self.file = open(file_name, 'a', encoding='utf-8')
        sys.stdout, sys.stderr = _Tee(sys.stdout, self.file), _Tee(sys.stderr, self.file)

class _Tee:
    def __init__(self, stream, file):
        self.stream, self.file = stream, file

    def write(self, text: str) -> None:
        self.stream.write(text)
        self.file.write(text)
        self.file.flush()

    def flush(self) -> None:
        self.stream.flush()
        self.file.flush()

#----------------------------------------------------------------------------
# Decide where to write and what to resume from (rank 0), then share it.

def _default_desc(tcfg: dict) -> str:
    dataset = os.path.splitext(os.path.basename(str(tcfg['dataset'].get('path', 'data')).rstrip('/')))[0] or 'data'
    network = tcfg['network']
    precond = str(network.get('_target_', 'net')).split('.')[-1].replace('Precond', '').lower()
    model = str(network.get('model_type', '')).lower().replace('unet', '')
    return '-'.join(x for x in [dataset, model, precond, f'batch{tcfg["batch_size"]}'] if x)

def _resolve_run(resume: str, tcfg: dict, desc: str) -> tuple[str, str | None, bool]:
    """(run_dir, state or None, whether run_dir is new); run_dir is locked for this process."""
    outdir = tcfg['outdir']
    if resume == 'none':
        return training_state.new_run_dir(outdir, desc), None, True
    if resume == 'auto':
        found = training_state.find_auto_resume(outdir, desc, tcfg) # Skips run dirs that a live run holds.
        if found is not None:
            return found[0], found[1], False
        return training_state.new_run_dir(outdir, desc), None, True
    if os.path.isdir(resume):
        training_state.lock_run_dir(resume) # Refused, naming the holder, while another run trains there.
        state = training_state.find_latest_state(resume)
        if state is None:
            raise ValueError(f'resume={resume}: no loadable training state in that run directory')
        return resume, state, False
    if os.path.isfile(resume):
        training_state.check_state_values(training_state.load_state(resume), resume) # Fail early, naming the file, if it is damaged.
        return training_state.new_run_dir(outdir, desc), resume, True
    raise ValueError(f"resume={resume}: no such file or directory (use 'auto', 'none', a run directory or a training-state file)")

def _no_experiment_message() -> str:
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs')
    names = sorted(os.path.splitext(n)[0] for n in os.listdir(folder) if n.endswith('.yaml')) if os.path.isdir(folder) else []
    return f'give an experiment config with -cn=<name>, e.g. -cn=edm_mri (configs in {folder}: {", ".join(names) or "none"})'

# The `_target_` slots of the training section and the kind of class each admits.
TARGET_SLOTS = (('dataset', 'dataset'), ('network', 'network'), ('loss', 'loss'), ('optimizer', 'optimizer'), ('augment', 'augment'))

#----------------------------------------------------------------------------

def _check_config(cfg: DictConfig) -> dict:
    """The checks that need no data or network, before a run directory exists -> plain training config."""
    if 'training' not in cfg: # No -cn: Hydra composed an empty config.
        raise ValueError(_no_experiment_message())
    config_mod.check_keys(cfg)
    sampling.check_sampler_options(config_mod.to_plain(cfg.sampling), prefix='sampling.') # A bad sampling setting fails before training.
    tcfg = config_mod.to_plain(cfg.training)
    for key, kind in TARGET_SLOTS: # Before anything is built: a slot admits only classes of its kind.
        if tcfg[key] is not None or key != 'augment':
            misc.check_target(tcfg[key], f'training.{key}', kind)
    from training import training_loop
    training_loop.check_options(**_loop_kwargs(tcfg))
    return tcfg

def _loop_kwargs(tcfg: dict) -> dict:
    return {k: v for k, v in tcfg.items() if k not in ('outdir', 'desc', 'dataset', 'network', 'loss', 'augment', 'optimizer', 'timeout_sec')}

def _timeout_sec(cfg: DictConfig) -> float:
    try:
        return float(cfg.training.timeout_sec)
    except Exception: # Missing or malformed: _check_config says so.
        return 1800

def run(cfg: DictConfig) -> None:
    # Every rank checks the config; on an error each prints its line and all exit together.
    dist.init(timeout_sec=_timeout_sec(cfg))
    tcfg, err = None, None
    try:
        tcfg = _check_config(cfg)
    except ValueError as e:
        err = e
    dist.fail_together(err)
    desc = tcfg['desc'] or _default_desc(tcfg)

    # Rank 0 picks and locks the run directory; every rank checks it got the same config.
    result = None
    if dist.get_rank() == 0:
        try:
            run_dir, state, is_new = _resolve_run(str(cfg.resume), tcfg, desc)
            result = ('ok', run_dir, state, is_new, tcfg)
        except (ValueError, FileNotFoundError) as err:
            result = ('error', str(err), None, False, tcfg)
    result = dist.broadcast_object(result)
    dist.fail_together(ValueError(result[1]) if result[0] == 'error' else None)
    _, run_dir, state, is_new, tcfg0 = result
    if tcfg0 != tcfg:
        raise ValueError('the ranks composed different training configs (check per-rank overrides and ${now:} resolvers)')

    # Log and save the resolved config (rank 0 holds the lock: no other run writes here).
    if dist.get_rank() == 0:
        training_state.remove_stale_tmp(run_dir)
        Logger(os.path.join(run_dir, 'log.txt'))
        if state is None or not os.path.isfile(os.path.join(run_dir, 'config.yaml')):
            text = OmegaConf.to_yaml(OmegaConf.create(dict(resume=str(cfg.resume), training=tcfg, sampling=config_mod.to_plain(cfg.sampling))))
            persistence.atomic_write_bytes(os.path.join(run_dir, 'config.yaml'), text.encode('utf-8'))
    dist.print0(f'Run directory:  {run_dir}')
    dist.print0(f'Processes:      {dist.get_world_size()} ({dist.get_device().type})')
    dist.print0(f'Resume from:    {state or "-"}')
    dist.print0()

    # Train. A run that fails before producing anything leaves no empty directory behind.
    from training import training_loop
    try:
        training_loop.training_loop(run_dir=run_dir, dataset_kwargs=tcfg['dataset'], network_kwargs=tcfg['network'],
            loss_kwargs=tcfg['loss'], augment_kwargs=tcfg['augment'], optimizer_kwargs=tcfg['optimizer'], resume_state=state, **_loop_kwargs(tcfg))
    except BaseException:
        if is_new and dist.get_rank() == 0:
            training_state.remove_empty_run(run_dir)
        raise

#----------------------------------------------------------------------------

@hydra.main(version_base='1.3', config_path='configs', config_name=None)
def main(cfg: DictConfig) -> None:
    """Entry point: train with the experiment config `-cn=<name>` and overrides."""
    dist.run_and_exit(run, cfg, user_errors=(ValueError, FileNotFoundError, FloatingPointError))

if __name__ == '__main__':
    config_mod.prepare_hydra_argv()
    main()

#----------------------------------------------------------------------------
