# medEDM: diffusion-model training toolkit for medical imaging.

"""Load a network snapshot for sampling or evaluation (generate.py,
evaluate.py): a medEDM snapshot through the restricted unpickler, or, with
the opt-in flag, the weights of an NVlabs/edm snapshot (training/edm_import.py,
which never runs the source such a file carries).

`_target_` names in a snapshot's `dataset_kwargs` that a later version moved
are rewritten through RENAMED_TARGETS, a table of strings: the engine never
imports a family package to do it."""

import torch

from training import edm_import
from training import stages

#----------------------------------------------------------------------------
# Classes that moved: old `_target_` -> new. Snapshots written before PET
# became the family package training/pet/ name training.pet_dataset.

RENAMED_TARGETS = {
    'training.pet_dataset.PETDataset': 'training.pet.dataset.PETDataset',
}

def upgrade_config(config):
    """Return `config` with a moved `_target_` renamed (other values unchanged)."""
    if isinstance(config, dict) and config.get('_target_') in RENAMED_TARGETS:
        return dict(config, _target_=RENAMED_TARGETS[config['_target_']])
    return config

#----------------------------------------------------------------------------

def load_network(path: str, trust_edm_pickle: bool = False, trust_flag: str = 'sampling.trust_edm_pickle=true') -> tuple[torch.nn.Module, dict]:
    """Return (the EMA network in eval mode without gradients, the snapshot dict).
    ValueError / FileNotFoundError name the file; `trust_flag` is how the user
    opts in to NVlabs/edm snapshots (named in the message that refuses one)."""
    if trust_edm_pickle:
        data = edm_import.load_snapshot(path)
    else:
        try:
            data = stages.load_snapshot(path) # ema and the frozen networks of earlier stages, eval mode.
        except ValueError:
            if edm_import.looks_like_edm_pickle(path):
                raise ValueError(f'{path} is an NVlabs/edm snapshot: its format executes the Python source it carries. '
                    f'To import its weights into medEDM networks (the source is never run), set {trust_flag} '
                    f'-- for files from a trusted source only') from None
            raise
    data.setdefault('frozen', {})
    net = data['ema']
    if not isinstance(net, torch.nn.Module):
        raise ValueError(f'network snapshot {path}: "ema" is not a network')
    if 'dataset_kwargs' in data:
        data = dict(data, dataset_kwargs=upgrade_config(data['dataset_kwargs']))
    return net.eval().requires_grad_(False), data

#----------------------------------------------------------------------------
