# medEDM: diffusion-model training toolkit for medical imaging.

"""What every `evaluate.py` subcommand shares: the sampler options (mapped
onto the options of sampling.sample() and checked by the one validation,
sampling.check_sampler_options), the snapshot loader, the output folder and
the device. A family defines its command in training/<family>/evaluation.py
(a click command named `command`) with these decorators; evaluate.py finds it
by the family's name. This module never imports a family."""

import functools
import os
import tempfile

import click
import torch

from training import network_snapshot
from training import sampling

#----------------------------------------------------------------------------
# Sampler options: key of sample() -> command-line option. Every solver,
# time-step discretization and option that generate.py takes.

SAMPLER_OPTION_NAMES = {
    'preset':           '--preset',
    'solver':           '--solver',
    'discretization':   '--discretization',
    'corrector':        '--corrector',
    'afs':              '--afs',
    'sigma_c':          '--sigma-c',
    'warp_k':           '--warp-k',
    'num_steps':        '--steps',
    'sigma_min':        '--sigma-min',
    'sigma_max':        '--sigma-max',
    'rho':              '--rho',
    'S_churn':          '--s-churn',
    'S_min':            '--s-min',
    'S_max':            '--s-max',
    'S_noise':          '--s-noise',
    'guidance':         '--guidance',
}

_SAMPLER_HELP = {
    'preset':           'Named sampling setting: fast (gauss_3m_sqrt + UniC + AFS, warped log-SNR steps; NFE = steps - 1)',
    'solver':           'Solver: heun, euler, dpmpp_2m, dpmpp_3m, dpmpp_2m_sde, gauss_2m, gauss_3m, gauss_2m_sqrt, gauss_3m_sqrt',
    'discretization':   'Time steps: edm, vp, ve, logsnr, logsnr_warped',
    'corrector':        'none, or unic (UniC corrector of dpmpp_2m / dpmpp_3m)',
    'afs':              'Analytic first step of dpmpp_2m / dpmpp_3m (one evaluation fewer)',
    'sigma_c':          'logsnr_warped: centre of the warp [default: the network\'s sigma_data; a preset: its multiple]',
    'warp_k':           'logsnr_warped: strength of the warp (0 = logsnr)',
    'num_steps':        'Number of sampler steps',
    'sigma_min':        'Lowest noise level (--preset fast sets max(0.014 sigma_data, 0.002); another value conflicts with it)',
    'sigma_max':        'Highest noise level',
    'rho':              'EDM time-step exponent',
    'S_churn':          'Churn of heun / euler (0 = deterministic)',
    'S_min':            'Lowest sigma with churn',
    'S_max':            'Highest sigma with churn',
    'S_noise':          'Noise inflation of the churn',
    'guidance':         'Classifier-free guidance weight (1 = off)',
}

def _click_type(key: str):
    default = sampling.SAMPLER_DEFAULTS[key]
    return str if isinstance(default, str) or key == 'preset' else int if key == 'num_steps' else float

def sampler_options(fn):
    """Decorator: add the sampler options to a click command; the command
    receives them as one checked dict `sampler` (the keyword arguments of
    sampling.sample()). A bad value is a ValueError naming the option."""
    @functools.wraps(fn)
    def wrapper(**kwargs):
        options = {key: kwargs.pop(key) for key in sampling.SAMPLER_KEYS}
        return fn(sampler=sampling.check_sampler_options(options, names=SAMPLER_OPTION_NAMES), **kwargs)
    for key in reversed(sampling.SAMPLER_KEYS):
        default = sampling.SAMPLER_DEFAULTS[key]
        if key == 'afs':
            wrapper = click.option('--afs/--no-afs', 'afs', help=_SAMPLER_HELP[key], default=default, show_default=True)(wrapper)
        else:
            wrapper = click.option(SAMPLER_OPTION_NAMES[key], key, help=_SAMPLER_HELP[key], type=_click_type(key), default=default,
                show_default=default is not None, metavar='NAME' if isinstance(default, str) or key == 'preset' else 'INT' if key == 'num_steps' else 'FLOAT')(wrapper)
    return wrapper

#----------------------------------------------------------------------------
# Options every subcommand takes: the snapshot, the output folder, the
# opt-in for NVlabs/edm snapshots, the batch size and the seed of sample j
# of condition i (sampling.posterior_seeds, as generate.py's cond_seed).

def common_options(fn):
    """Decorator: --network, --trust-edm-pickle, --outdir, --batch, --seed."""
    for option in reversed([
        click.option('--network', 'network_pkl', help='Network snapshot (network-snapshot-*.pkl)', metavar='PKL', type=str, required=True),
        click.option('--trust-edm-pickle', help='Read an NVlabs/edm snapshot (trusted files only: that format is built to run code)', is_flag=True),
        click.option('--outdir', help='Where to write the results', metavar='DIR', type=str, required=True),
        click.option('--batch', help='Sampling batch size', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True),
        click.option('--seed', help='Sample j of condition i uses seed + i * samples + j', metavar='INT', type=click.IntRange(min=0), default=0, show_default=True),
    ]):
        fn = option(fn)
    return fn

#----------------------------------------------------------------------------
# The snapshot loader of every subcommand: generate.py's (training/network_snapshot.py).

def load_network(path: str, trust_edm_pickle: bool, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """(network on `device`, in eval mode without gradients, snapshot dict with its frozen networks
    of earlier stages on `device` too, as generate.py has them); ValueError naming the file."""
    net, snapshot = network_snapshot.load_network(path, trust_edm_pickle, trust_flag='--trust-edm-pickle')
    snapshot['frozen'] = {name: frozen.to(device) for name, frozen in snapshot['frozen'].items()}
    return net.to(device), snapshot

def default_device() -> torch.device:
    return torch.device('cuda') if torch.cuda.is_available() else torch.device('cpu')

#----------------------------------------------------------------------------
# Output folder: refused early if it cannot be a folder (nothing read or
# sampled yet); made, with a file written to it, only once every input has
# been checked, before sampling.

def check_outdir(outdir: str) -> None:
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise ValueError(f'--outdir: {outdir} exists and is not a folder')

def make_outdir(outdir: str) -> None:
    check_outdir(outdir)
    try:
        os.makedirs(outdir, exist_ok=True)
        with tempfile.TemporaryFile(dir=outdir):
            pass
    except OSError as err:
        raise ValueError(f'--outdir: cannot write to {outdir} ({err.strerror or err})') from None

#----------------------------------------------------------------------------
