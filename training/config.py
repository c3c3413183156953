# medEDM: diffusion-model training toolkit for medical imaging.

"""Experiment configuration: a dataclass schema registered with Hydra, so
unknown keys and wrong types fail with a message naming the key, and the
Hydra settings that keep torchrun ranks from creating output folders.

An experiment YAML (configs/<name>.yaml) starts with
    defaults: [medEDM_schema, _self_]
and holds a `training` and a `sampling` section plus the top-level `resume`."""

import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf

#----------------------------------------------------------------------------
# Schema.

@dataclass
class FreezeConfig:
    params: str = '???'                 # Glob over parameter names, e.g. "model.enc.*".
    start_kimg: float = 0               # Freeze from this kimg ...
    end_kimg: Optional[float] = None    # ... until this kimg (None = to the end of the run).

@dataclass
class TrainingConfig:
    outdir: str = 'training-runs'       # Where run directories <NNNNN>-<desc> are created.
    desc: Optional[str] = None          # Run-directory suffix, None = from dataset and network.
    dataset: Any = '???'                # Training set: {_target_: training.dataset.NpzDataset, path: ...}.
    network: Any = '???'                # Preconditioned network: {_target_: training.networks.EDMPrecond, ...}.
    loss: Any = field(default_factory=lambda: {'_target_': 'training.loss.EDMLoss'})
    augment: Any = None                 # Augment pipe, None = no augmentation.
    optimizer: Any = field(default_factory=lambda: {'_target_': 'torch.optim.Adam', 'lr': 10e-4, 'betas': [0.9, 0.999], 'eps': 1e-8})
    seed: int = 0                       # Random seed (data order, weights init, noise).
    batch_size: int = 512               # Total batch size per step (all processes).
    batch_gpu: Optional[int] = None     # Limit per process (gradient accumulation), None = no limit.
    total_kimg: float = 200000          # Training duration in thousands of images.
    ema_halflife_kimg: float = 500      # EMA half-life.
    ema_rampup_ratio: Optional[float] = 0.05 # EMA ramp-up coefficient, None = no ramp-up.
    lr_rampup_kimg: float = 10000       # Learning-rate ramp-up.
    lr_decay: str = 'constant'          # 'constant', 'cosine' or 'isqrt'.
    lr_decay_kimg: float = 0            # Reference kimg of 'isqrt' decay.
    lr_min_ratio: float = 0             # Final lr fraction of 'cosine' decay.
    grad_clip: Optional[float] = None   # Gradient-norm clipping, None = off.
    loss_scaling: float = 1             # Loss scaling factor.
    precision: str = 'fp32'             # 'fp32', 'bf16' or 'fp16' (CUDA only).
    freeze: list[FreezeConfig] = field(default_factory=list) # Module-freezing schedule.
    frozen: dict[str, str] = field(default_factory=dict) # Earlier stages' networks {name: network-snapshot-*.pkl}, handed to the loss, embedded in snapshots.
    init_from: Any = None               # Warm start: a snapshot path or {path, module, source, strict}, None = off.
    max_nonfinite_steps: int = 10       # Abort after this many consecutive non-finite steps.
    kimg_per_tick: float = 50           # Progress-print interval.
    snapshot_ticks: Optional[int] = 50  # Snapshot + sample grid interval in ticks, None = off.
    state_dump_ticks: Optional[int] = 500 # Training-state interval in ticks, None = off.
    grid_images: int = 64               # Images in the sample grid, 0 = off.
    grid_steps: int = 18                # Sampler steps for the sample grid.
    slice_kimg: Optional[float] = None  # Stop after this many kimg per invocation (cluster time slices).
    workers: int = 2                    # DataLoader workers per process.
    print_summary: bool = True          # Print the module summary at start-up.
    cudnn_benchmark: bool = True        # torch.backends.cudnn.benchmark.
    timeout_sec: float = 1800           # Process-group timeout.

@dataclass
class SamplingConfig:
    network_pkl: Optional[str] = None   # Network snapshot (network-snapshot-*.pkl).
    trust_edm_pickle: bool = False      # Read an NVlabs/edm snapshot (trusted files only: that format is built to run code).
    seeds: Any = '0-63'                 # Seeds: 0-63, "0,3,10-19" or [0, 2, 5].
    batch: int = 64                     # Maximum batch size per process.
    outdir: Optional[str] = None        # Output folder, None = <snapshot>-samples next to the snapshot.
    format: str = 'png'                 # 'png' (one file per seed / panel per condition), 'npz' (images.npz) or 'nifti'.
    subdirs: bool = False               # PNG: one subfolder per 1000 seeds.
    class_idx: Optional[int] = None     # Class label, None = random.
    preset: Optional[str] = None        # Named sampling setting: 'fast' (few-step; sets solver, discretization, corrector, afs, warp_k, and sigma_c / sigma_min relative to sigma_data; NFE = num_steps - 1), None = off.
    solver: str = 'heun'                # 'heun' (EDM Algorithm 2), 'euler', 'dpmpp_2m', 'dpmpp_3m', 'dpmpp_2m_sde', 'gauss_2m', 'gauss_3m', 'gauss_*_sqrt'.
    discretization: str = 'edm'         # Time steps: 'edm' (rho), 'vp', 've', 'logsnr' (uniform log sigma), 'logsnr_warped' (log sigma warped around sigma_c; used by the bench's dpmpp_2m + unic + afs; plain dpmpp_3m needs 13 / 14 / 14 NFE with it vs 11 / 14 / 15 with logsnr on the bench's Gaussian / mixture / net).
    corrector: str = 'none'             # 'none' or 'unic' (UniC corrector of dpmpp_2m / dpmpp_3m: one order higher, no extra evaluations).
    afs: bool = False                   # Analytic first step of dpmpp_2m / dpmpp_3m: no evaluation at sigma_max (N-1 evaluations).
    sigma_c: Optional[float] = None     # logsnr_warped only (refused with other steps): centre of the warp, None = the network's sigma_data (a preset's multiple of it).
    warp_k: float = 0.3                 # logsnr_warped only (refused with other steps unless 0.3): strength k of the warp, >= 0 (0 = logsnr).
    num_steps: int = 18                 # Number of sampling steps (heun: 2N-1 network evaluations, others N; N-1 with afs).
    sigma_min: float = 0.002            # Lowest noise level (a preset sets its own multiple of sigma_data).
    sigma_max: float = 80               # Highest noise level.
    rho: float = 7                      # Time-step exponent.
    S_churn: float = 0                  # Stochasticity strength (heun, euler).
    S_min: float = 0                    # Stochastic sigma range, low end.
    S_max: float = float('inf')         # Stochastic sigma range, high end.
    S_noise: float = 1                  # Noise inflation.
    guidance: float = 1                 # Classifier-free guidance weight w (1 = off, 0 = unconditional); needs label_dropout in training.
    cond_dataset: Any = None            # Conditions: {_target_: ..., path: ...}; None = the snapshot's dataset_kwargs.
    cond_indices: Any = None            # Items of the condition dataset: 0-9, "0,4,7"; None = all.
    samples_per_cond: int = 8           # S samples (seeds) per condition -> posterior mean and std.
    cond_seed: int = 0                  # Sample j of item i uses seed cond_seed + i * samples_per_cond + j.
    affine_from: Optional[str] = None   # Unconditional NIfTI output: reference volume whose affine and header the files carry (None = identity).
    batch_invariant: bool = True        # Evaluate the network per sample: seed -> bit-identical sample for any batch/world size.

@dataclass
class ExperimentConfig:
    resume: str = 'auto'                # 'auto', 'none', a run directory or a training-state file.
    training: TrainingConfig = field(default_factory=TrainingConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

def register() -> None:
    from hydra.core.config_store import ConfigStore
    ConfigStore.instance().store(name='medEDM_schema', node=ExperimentConfig)

#----------------------------------------------------------------------------
# Hydra under torchrun: no per-rank output folders, no log files, no chdir.

HYDRA_OVERRIDES = ['hydra.run.dir=.', 'hydra.output_subdir=null', 'hydra/job_logging=none', 'hydra/hydra_logging=none']

def prepare_hydra_argv() -> None:
    """Append the Hydra settings that every entry point needs to sys.argv."""
    if any(a in ('--help', '-h', '--hydra-help') for a in sys.argv[1:]):
        return
    sys.argv += [o for o in HYDRA_OVERRIDES if o not in sys.argv]

#----------------------------------------------------------------------------
# Checks that the schema alone cannot make.

def check_keys(cfg: DictConfig) -> None:
    """Reject keys added with `+key=...` to schema sections (Hydra accepts them)."""
    def walk(node, schema_cls, where):
        allowed = {f.name: f for f in dataclasses.fields(schema_cls)}
        for key in node.keys():
            if key not in allowed:
                raise ValueError(f"Key '{where}{key}' not in '{schema_cls.__name__}'")
            ftype = allowed[key].type
            if dataclasses.is_dataclass(ftype) and isinstance(node[key], DictConfig):
                walk(node[key], ftype, f'{where}{key}.')
    walk(cfg, ExperimentConfig, '')

def to_plain(node: Any) -> Any:
    """OmegaConf node -> plain dicts and lists (nothing of OmegaConf may reach a snapshot)."""
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node

#----------------------------------------------------------------------------
