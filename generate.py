# medEDM: diffusion-model training toolkit for medical imaging.

"""Generate images with a trained network snapshot.

Examples:

\b
# 64 images as PNG files, 2 processes:
torchrun --standalone --nproc_per_node=2 generate.py -cn=edm_mri \\
    sampling.network_pkl=training-runs/00000-mni/network-snapshot-000200.pkl sampling.seeds=0-63

\b
# Seeds 0, 3 and 10-19 into one images.npz with DPM-Solver++(3M) at 15 evaluations (quote lists for Hydra):
python generate.py -cn=edm_mri sampling.network_pkl=... 'sampling.seeds="0,3,10-19"' sampling.format=npz \\
    sampling.solver=dpmpp_3m sampling.discretization=logsnr sampling.num_steps=15

\b
# Conditional network (cond_channels > 0): 16 samples for each of the conditions 0-9 of a dataset
# whose items carry `cond` (default: the snapshot's training set), with posterior mean and std:
python generate.py -cn=<experiment> sampling.network_pkl=... sampling.format=npz \\
    sampling.cond_indices=0-9 sampling.samples_per_cond=16 \\
    'sampling.cond_dataset={_target_: <dataset class>, path: test-set.npz}'

Solvers (`sampling.solver`, NFE = network evaluations for N = `sampling.num_steps`):
heun (EDM Algorithm 2, 2N-1; stochastic with sampling.S_churn > 0), euler (N),
dpmpp_2m and dpmpp_3m (DPM-Solver++ multistep, N), dpmpp_2m_sde (SDE, N).
The multistep solvers take `sampling.corrector=unic` (UniC, no extra
evaluations) and `sampling.afs=true` (analytic first step, N-1 evaluations;
generation from pure noise only). Time steps (`sampling.discretization`): edm
(rho), vp, ve, logsnr, logsnr_warped (`sampling.sigma_c`, `sampling.warp_k`);
bench/sampler_accuracy.py: dpmpp_2m + logsnr_warped + unic + afs reaches the
accuracy of heun at 35 evaluations with 10-12 on its three settings (12 on the
network one; other mixtures and latent batches needed 10-25, the same network
trained 1500 steps 25). Classifier-free
guidance (`sampling.guidance` = w): D = D_uncond + w (D_cond - D_uncond) with the
zero label vector as the unconditional case; the network must be trained with
`training.network.label_dropout` > 0 (e.g. 0.1) to learn it. w = 1 is off, and
costs one network call per evaluation; other w cost two.

The sample of a seed is the same whatever the batch size and the number of
processes. In conditional mode sample j of dataset item i uses the seed
`sampling.cond_seed + i * sampling.samples_per_cond + j` (`sampling.seeds` is
not used), so it depends only on the item, j and these two settings.
Conditional outputs: images.npz with `images` [K, S, C, ...], `seeds` [K, S],
`cond_images` [K, Cc, ...], `mean` and `std` [K, C, ...] (population std over
the S samples, ddof = 0), `indices` [K] (and `reference_images`, `labels` where
the dataset has them); or one PNG panel per item (condition | reference |
samples | mean | std scaled to its maximum; volumes show their middle slice);
or NIfTI files `<index>-mean.nii.gz`, `-std.nii.gz`, `-samples.nii.gz` (samples
along the 4th axis), float32, with the affine and header of the item (its
`affine`, `header` or `nifti_path` entries) and the tensor's spatial axes as
the NIfTI axes. Unconditional NIfTI output (`sampling.format=nifti`, one
`<seed>.nii.gz` per seed) carries the affine and header of the reference
volume `sampling.affine_from=<file.nii.gz>` (identity without one).

Snapshots load through a restricted unpickler: only this project's classes and
tensors, never arbitrary code. An NVlabs/edm `network-snapshot-*.pkl` is read
with `sampling.trust_edm_pickle=true`: its format is designed to execute the
Python source it carries; the importer (training/edm_import.py) never runs that
source and copies only the weights into this project's networks, but use the
flag for files from a trusted source only.
"""

import gzip
import io
import os
import tempfile
import time

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from torch_utils import distributed as dist
from torch_utils import misc
from torch_utils import persistence
from training import config as config_mod
from training import image_io
from training import network_snapshot
from training import sampling
from training import solvers
from training import stages

config_mod.register()

SOLVERS = solvers.SOLVERS
FORMATS = ('png', 'npz', 'nifti')

#----------------------------------------------------------------------------
# Per-batch progress line on rank 0: images done, time per batch, remaining time.

class Progress:
    def __init__(self, num_batches: int, what: str = 'images'):
        self.num_batches = num_batches
        self.what = what
        self.start = time.time()
        self.done = 0

    def update(self, batch_idx: int, batch_len: int) -> None:
        self.done += batch_len
        elapsed = time.time() - self.start
        eta = elapsed / (batch_idx + 1) * (self.num_batches - batch_idx - 1)
        dist.print0(f'batch {batch_idx + 1}/{self.num_batches}: {self.done} {self.what} on rank 0, '
            f'{elapsed / (batch_idx + 1):.1f} s/batch, elapsed {misc.format_time(elapsed)}, eta {misc.format_time(eta)}', flush=True)

#----------------------------------------------------------------------------
# Solver settings of the config, as keyword arguments of sampling.sample.

def sampler_kwargs(scfg: dict) -> dict:
    return {k: scfg[k] for k in sampling.SAMPLER_KEYS}

#----------------------------------------------------------------------------
# Unconditional / class-conditional generation, one batch of seeds at a time.

def generate_images(
    net,                        # Network (EMA) from a snapshot.
    seeds,                      # Seeds of this process, split into batches (list of lists).
    device,                     # Device to run on.
    class_idx   = None,         # Class label, None = random per seed.
    sampler_kwargs = {},        # Arguments of sampling.sample (solver, num_steps, guidance, ...).
    decode      = None,         # Samples -> images (a latent model's decoder, training/stages.py), None = as sampled.
):
    """Yield (seeds, images float32 [B, C, ...] in [-1, 1]-ish units) per batch."""
    shape = sampling.sample_shape(net)
    for batch_seeds in seeds:
        if len(batch_seeds) == 0:
            continue
        rnd = sampling.StackedRandomGenerator(device, batch_seeds)
        latents = rnd.randn([len(batch_seeds), *shape], device=device)
        class_labels = None
        if net.label_dim:
            class_labels = torch.eye(net.label_dim, device=device)[rnd.randint(net.label_dim, size=[len(batch_seeds)], device=device)]
            if class_idx is not None:
                class_labels[:, :] = 0
                class_labels[:, class_idx] = 1
        images = sampling.sample(net, latents, class_labels=class_labels, randn_like=rnd.randn_like, **sampler_kwargs)
        if decode is not None:
            images = decode(images)
        yield batch_seeds, images.to(torch.float32)

#----------------------------------------------------------------------------
# Checks of the config that need no network.

def _check(scfg: dict) -> list[int]:
    if not scfg['network_pkl']:
        raise ValueError('sampling.network_pkl is required: the network-snapshot-*.pkl to sample from')
    sampling.check_sampler_options(scfg, prefix='sampling.')
    if scfg['format'] not in FORMATS:
        raise ValueError(f'sampling.format: expected one of {", ".join(FORMATS)}, got {scfg["format"]!r}')
    if scfg['batch'] < 1:
        raise ValueError(f'sampling.batch must be >= 1, got {scfg["batch"]}')
    if scfg['samples_per_cond'] < 1:
        raise ValueError(f'sampling.samples_per_cond must be >= 1, got {scfg["samples_per_cond"]}')
    seeds = misc.parse_int_list(scfg['seeds'], 'sampling.seeds')
    if len(seeds) == 0:
        raise ValueError('sampling.seeds: no seeds given')
    if len(set(seeds)) != len(seeds):
        raise ValueError('sampling.seeds: seeds repeat')
    if min(seeds) < 0 or max(seeds) >= sampling.SEED_LIMIT: # Generators take seeds mod 2^32: two seeds would give one sample.
        raise ValueError(f'sampling.seeds: seeds must be in [0, 2**32), got {min(seeds) if min(seeds) < 0 else max(seeds)}')
    return seeds

#----------------------------------------------------------------------------
# Load the network: training/network_snapshot.py (shared with evaluate.py).

load_network = network_snapshot.load_network

#----------------------------------------------------------------------------
# Conditional generation: the conditions (dataset items) and their checks.

def _to_numpy(x) -> np.ndarray: # Dataset items may hold tensors or arrays.
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)

def condition_dataset(cond_dataset: dict | None, snapshot: dict) -> torch.utils.data.Dataset:
    """The dataset conditions come from: `cond_dataset` ({_target_: ..., ...}) if given, else the snapshot's own
    dataset_kwargs (checked like every class a snapshot names)."""
    if cond_dataset is not None:
        return misc.construct_class(cond_dataset, 'sampling.cond_dataset')
    kwargs = snapshot.get('dataset_kwargs') or {}
    if not isinstance(kwargs, dict) or '_target_' not in kwargs:
        raise ValueError('sampling.cond_dataset: the network needs condition images (cond_channels > 0) and the snapshot '
            'has no usable dataset_kwargs; set sampling.cond_dataset={_target_: ..., path: ...}')
    where = 'dataset_kwargs of the snapshot (override with sampling.cond_dataset)'
    persistence.check_snapshot_config(kwargs, torch.utils.data.Dataset, where)
    return misc.construct_class(kwargs, where)

def load_conditions(net, scfg: dict, snapshot: dict) -> dict:
    """Items of the condition dataset: cond [K, Cc, ...], labels, references, per-item metadata."""
    dataset = condition_dataset(scfg['cond_dataset'], snapshot)
    n = len(dataset)
    indices = list(range(n)) if scfg['cond_indices'] is None else misc.parse_int_list(scfg['cond_indices'], 'sampling.cond_indices')
    if len(indices) == 0:
        raise ValueError('sampling.cond_indices: no items given')
    if len(set(indices)) != len(indices):
        raise ValueError('sampling.cond_indices: indices repeat')
    for i in indices:
        if not 0 <= i < n:
            raise ValueError(f'sampling.cond_indices: index {i} out of range for a condition dataset of {n} items')

    # Read and check the items.
    shape = sampling.sample_shape(net)
    expected = (net.cond_channels, *shape[1:])
    conds, labels, refs, meta = [], [], [], []
    for i in indices:
        item = dataset[i]
        if 'cond' not in item:
            raise ValueError(f'sampling.cond_dataset: item {i} has no "cond" (condition image); the network needs {net.cond_channels} condition channel(s)')
        cond = _to_numpy(item['cond']).astype(np.float32)
        if tuple(cond.shape) != expected:
            raise ValueError(f'sampling.cond_dataset: the condition of item {i} has shape {tuple(cond.shape)}, but the network '
                f'expects {expected} (cond_channels={net.cond_channels}, sample shape {tuple(shape)})')
        conds.append(cond)
        if net.label_dim:
            if 'label' in item:
                label = _to_numpy(item['label']).astype(np.float32).reshape(-1)
                if label.shape != (net.label_dim,):
                    raise ValueError(f'sampling.cond_dataset: the label of item {i} has {label.size} entries, the network has label_dim={net.label_dim}')
            elif scfg['class_idx'] is not None:
                label = np.eye(net.label_dim, dtype=np.float32)[scfg['class_idx']]
            else:
                raise ValueError(f'sampling.cond_dataset: item {i} has no label and the network is class-conditional; set sampling.class_idx')
            labels.append(label)
        image = item.get('image')
        refs.append(None if image is None or tuple(np.shape(image)) != tuple(shape) else _to_numpy(image).astype(np.float32))
        item_meta = {k: item[k] for k in ('affine', 'header', 'nifti_header', 'nifti_path') if k in item}
        if scfg['format'] == 'nifti': # Read the geometry now: a bad one must fail before sampling, not after.
            try:
                item_meta = dict(zip(('affine', 'header'), _nifti_affine_header(item_meta)))
            except Exception as err: # pylint: disable=broad-except
                raise ValueError(f'sampling.cond_dataset: cannot read the NIfTI affine / header of item {i}: {err}') from None
        meta.append(item_meta)
    return dict(indices=indices, cond=np.stack(conds), labels=np.stack(labels) if labels else None,
        references=np.stack(refs) if all(r is not None for r in refs) else None, meta=meta)

#----------------------------------------------------------------------------
# Conditional generation: S seeds per condition, tasks (item k, sample j)
# split over processes and batches like seeds; gathered on rank 0.

def generate_posterior(net, conds: dict, scfg: dict, device, rank: int, world_size: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Return (samples [K, S, C, ...], seeds [K, S]) on rank 0, None elsewhere."""
    K, S = len(conds['indices']), scfg['samples_per_cond']
    seeds = sampling.posterior_seeds(conds['indices'], S, scfg['cond_seed'])
    shape = sampling.sample_shape(net)
    batches = sampling.split_seeds(list(range(K * S)), scfg['batch'], rank, world_size)
    progress = Progress(len(batches), 'samples')
    kwargs = sampler_kwargs(scfg)
    results = []
    for b, tasks in enumerate(batches):
        if len(tasks) > 0:
            items = [t // S for t in tasks]
            rnd = sampling.StackedRandomGenerator(device, [int(seeds.flat[t]) for t in tasks])
            latents = rnd.randn([len(tasks), *shape], device=device)
            cond = torch.as_tensor(conds['cond'][items], device=device)
            labels = None if conds['labels'] is None else torch.as_tensor(conds['labels'][items], device=device)
            images = sampling.sample(net, latents, class_labels=labels, cond=cond, randn_like=rnd.randn_like, **kwargs)
            results.append((tasks, images.to(torch.float32).cpu().numpy()))
        progress.update(b, len(tasks))
    gathered = [results]
    if world_size > 1:
        gathered = [None] * world_size
        torch.distributed.all_gather_object(gathered, results)
    if rank != 0:
        return None
    samples = np.zeros([K * S, *shape], dtype=np.float32)
    for part in gathered:
        for tasks, images in part:
            samples[tasks] = images
    return samples.reshape(K, S, *shape), seeds

#----------------------------------------------------------------------------
# NIfTI output (float32), with the affine and header of the item. The
# tensor's spatial axes are the NIfTI axes; channels (if C > 1) and samples
# go after them.

def _nifti_affine_header(meta: dict): # From the item's affine / header / nifti_path (a header alone: its own affine); identity otherwise.
    import nibabel as nib
    affine, header = meta.get('affine'), meta.get('header', meta.get('nifti_header'))
    if (affine is None or header is None) and meta.get('nifti_path'):
        src = nib.load(os.fspath(meta['nifti_path']))
        affine = src.affine if affine is None else affine
        header = src.header if header is None else header
    if isinstance(header, (bytes, bytearray)):
        header = nib.Nifti1Header.from_fileobj(io.BytesIO(bytes(header)))
    if affine is None: # The header's own placement (sform, else qform), identity without a header.
        affine = np.eye(4) if header is None else nib.Nifti1Header.from_header(header).get_best_affine()
    header = nib.Nifti1Header() if header is None else nib.Nifti1Header.from_header(header)
    affine = np.asarray(_to_numpy(affine), dtype=np.float64)
    affine = affine.reshape(4, 4) if affine.size == 16 else affine
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise ValueError(f'the affine must be a finite 4 x 4 matrix, got shape {affine.shape}')
    return affine, header

def write_nifti(path: str, data_c: np.ndarray, meta: dict, extra_axis: bool = False) -> None:
    """Write [C, *spatial] (or [S, C, *spatial] with extra_axis) as float32 NIfTI."""
    import nibabel as nib
    data = np.asarray(data_c, dtype=np.float32)
    if extra_axis: # [S, C, *sp] -> [*sp, S, C].
        data = np.moveaxis(np.moveaxis(data, 0, -1), 0, -1)
        data = data[..., 0] if data.shape[-1] == 1 else data
    else: # [C, *sp] -> [*sp, C].
        data = data[0] if data.shape[0] == 1 else np.moveaxis(data, 0, -1)
    affine, header = _nifti_affine_header(meta)
    header.set_data_dtype(np.float32)
    img = nib.Nifti1Image(np.ascontiguousarray(data), affine, header=header)
    img.header.set_slope_inter(None, None)
    persistence.atomic_write_bytes(path, gzip.compress(img.to_bytes(), mtime=0))

#----------------------------------------------------------------------------
# PNG panel of one condition: one grayscale tile per channel of the
# condition, the reference, the first 8 samples, the mean and the std
# (shown from 0 to its maximum). Volumes show their middle slice.

def _middle_slice(x: np.ndarray) -> np.ndarray: # [C, D, H, W] -> [C, H, W].
    while x.ndim > 3:
        x = x[:, x.shape[1] // 2]
    return x

def _tiles(x: np.ndarray) -> list[np.ndarray]: # One [1, H, W] tile per channel.
    return [c[None] for c in _middle_slice(x)]

def write_panel(path: str, cond: np.ndarray, samples: np.ndarray, mean: np.ndarray, std: np.ndarray, reference: np.ndarray | None) -> None:
    tiles = _tiles(cond) + (_tiles(reference) if reference is not None else [])
    for s in samples[:8]:
        tiles += _tiles(s)
    tiles += _tiles(mean) + _tiles(std / max(float(std.max()), 1e-12) * 2 - 1)
    image_io.save_image_grid(np.stack(tiles), path, grid_size=(len(tiles), 1))

#----------------------------------------------------------------------------
# Write the outputs of conditional generation (rank 0).

def write_posterior(outdir: str, fmt: str, conds: dict, samples: np.ndarray, seeds: np.ndarray) -> None:
    mean, std = sampling.posterior_stats(samples, axis=1)
    indices = conds['indices']
    if fmt == 'npz':
        arrays = dict(images=samples, seeds=seeds, cond_images=conds['cond'], mean=mean, std=std, indices=np.asarray(indices, dtype=np.int64))
        if conds['references'] is not None:
            arrays['reference_images'] = conds['references']
        if conds['labels'] is not None:
            arrays['labels'] = conds['labels']
        persistence.atomic_write(os.path.join(outdir, 'images.npz'), lambda f: np.savez(f, **arrays))
        return
    for k, idx in enumerate(indices):
        if fmt == 'png':
            ref = None if conds['references'] is None else conds['references'][k]
            write_panel(os.path.join(outdir, f'{idx:06d}.png'), conds['cond'][k], samples[k], mean[k], std[k], ref)
        else:
            write_nifti(os.path.join(outdir, f'{idx:06d}-mean.nii.gz'), mean[k], conds['meta'][k])
            write_nifti(os.path.join(outdir, f'{idx:06d}-std.nii.gz'), std[k], conds['meta'][k])
            write_nifti(os.path.join(outdir, f'{idx:06d}-samples.nii.gz'), samples[k], conds['meta'][k], extra_axis=True)

#----------------------------------------------------------------------------
# Unconditional / class-conditional generation and its outputs.

def run_unconditional(net, scfg: dict, seeds: list[int], outdir: str, device, rank: int, world_size: int, decode=None) -> None:
    batches = sampling.split_seeds(seeds, scfg['batch'], rank, world_size)
    meta = {} # NIfTI geometry: the affine and header of sampling.affine_from, read before sampling; identity without one.
    if scfg.get('affine_from') is not None:
        try:
            meta = dict(zip(('affine', 'header'), _nifti_affine_header({'nifti_path': scfg['affine_from']})))
        except Exception as err: # pylint: disable=broad-except # nibabel raises many kinds.
            raise ValueError(f'sampling.affine_from: cannot read the NIfTI affine / header of {scfg["affine_from"]}: {err}') from None
    dist.print0(f'Generating {len(seeds)} images to "{outdir}"...')
    progress = Progress(len(batches))
    results = []
    for i, (batch_seeds, images) in enumerate(generate_images(net, batches, device, scfg['class_idx'], sampler_kwargs(scfg), decode)):
        images = images.cpu().numpy()
        if scfg['format'] in ('png', 'nifti'):
            for seed, image in zip(batch_seeds, images):
                folder = os.path.join(outdir, f'{seed - seed % 1000:06d}') if scfg['subdirs'] else outdir
                os.makedirs(folder, exist_ok=True)
                if scfg['format'] == 'png':
                    image_io.save_png(_middle_slice(image), os.path.join(folder, f'{seed:06d}.png'))
                else:
                    write_nifti(os.path.join(folder, f'{seed:06d}.nii.gz'), image, meta)
        else:
            results.append((batch_seeds, images))
        progress.update(i, len(batch_seeds))

    # Collect npz output on rank 0, in the order of the seed list.
    if scfg['format'] == 'npz':
        gathered = [results]
        if world_size > 1:
            gathered = [None] * world_size
            torch.distributed.all_gather_object(gathered, results)
        if rank == 0:
            by_seed = {s: img for part in gathered for batch_seeds, imgs in part for s, img in zip(batch_seeds, imgs)}
            images = np.stack([by_seed[s] for s in seeds]).astype(np.float32)
            path = os.path.join(outdir, 'images.npz')
            persistence.atomic_write(path, lambda f: np.savez(f, images=images, seeds=np.asarray(seeds, dtype=np.int64)))

#----------------------------------------------------------------------------

def run(cfg: DictConfig) -> None:
    config_mod.check_keys(cfg)
    scfg = config_mod.to_plain(cfg.sampling)
    seeds = _check(scfg)
    dist.init()
    device = dist.get_device()
    rank, world_size = dist.get_rank(), dist.get_world_size()

    # Load network.
    dist.print0(f'Loading network from "{scfg["network_pkl"]}"...')
    net, snapshot = load_network(scfg['network_pkl'], scfg['trust_edm_pickle'])
    net = net.to(device)
    snapshot['frozen'] = {name: frozen.to(device) for name, frozen in (snapshot.get('frozen') or {}).items()}
    decode = (lambda x: stages.decode(snapshot, x)) if hasattr(snapshot.get('loss_fn'), 'decode') else None
    if scfg['batch_invariant']:
        net = sampling.PerSampleNet(net)
    if scfg['class_idx'] is not None and not (0 <= scfg['class_idx'] < max(net.label_dim, 0)):
        raise ValueError(f'sampling.class_idx={scfg["class_idx"]}: the network has {net.label_dim} classes')
    sampling.check_guidance(net, scfg['guidance'], key='sampling.guidance')
    conditional = bool(getattr(net, 'cond_channels', 0))
    if conditional and decode is not None: # Its conditions live in latent space and its samples need decoding: not done here.
        raise ValueError(f'sampling.network_pkl: {scfg["network_pkl"]} is a conditional latent model (its loss object decodes samples); '
            f'generate.py samples latent models unconditionally only (use its family\'s evaluate.py command)')
    if not conditional and scfg['cond_dataset'] is not None:
        raise ValueError('sampling.cond_dataset: the network takes no condition images (cond_channels=0)')
    conds = load_conditions(net, scfg, snapshot) if conditional else None
    if conditional: # Seeds in range, before anything is written.
        sampling.posterior_seeds(conds['indices'], scfg['samples_per_cond'], scfg['cond_seed'], key='sampling.cond_seed')

    # Output location: made, and a file written to it, on rank 0 before any sampling; every rank learns the outcome.
    outdir = scfg['outdir'] or os.path.splitext(scfg['network_pkl'])[0] + '-samples'
    problem = None
    if rank == 0:
        try:
            os.makedirs(outdir, exist_ok=True)
            with tempfile.TemporaryFile(dir=outdir):
                pass
        except OSError as err:
            problem = f'sampling.outdir: cannot write to {outdir} ({err.strerror or err})'
    problem = dist.broadcast_object(problem)
    if problem is not None:
        raise ValueError(problem)

    # Generate.
    if not conditional:
        run_unconditional(net, scfg, seeds, outdir, device, rank, world_size, decode)
    else:
        K, S = len(conds['indices']), scfg['samples_per_cond']
        dist.print0(f'Generating {S} samples for each of {K} conditions to "{outdir}"...')
        result = generate_posterior(net, conds, scfg, device, rank, world_size)
        if rank == 0:
            write_posterior(outdir, scfg['format'], conds, *result)
    dist.barrier()
    dist.print0('Done.')

#----------------------------------------------------------------------------

@hydra.main(version_base='1.3', config_path='configs', config_name=None)
def main(cfg: DictConfig) -> None:
    """Entry point: generate with the experiment config `-cn=<name>` and `sampling.*` overrides."""
    dist.run_and_exit(run, cfg)

if __name__ == '__main__':
    config_mod.prepare_hydra_argv()
    main()

#----------------------------------------------------------------------------
