# medEDM: diffusion-model training toolkit for medical imaging.

"""Generate images with a trained network snapshot.

Examples:

\b
# 64 images as PNG files, 2 processes:
torchrun --standalone --nproc_per_node=2 generate.py -cn=edm_mri \\
    sampling.network_pkl=training-runs/00000-mni/network-snapshot-000200.pkl sampling.seeds=0-63

\b
# Seeds 0, 3 and 10-19 into one images.npz (quote lists for Hydra):
python generate.py -cn=edm_mri sampling.network_pkl=... 'sampling.seeds="0,3,10-19"' sampling.format=npz

The sample of a seed is the same whatever the batch size and the number of
processes. Snapshots load through a restricted unpickler: only this project's
classes and tensors, never arbitrary code.
"""

import os
import sys

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from torch_utils import distributed as dist
from torch_utils import misc
from torch_utils import persistence
from training import config as config_mod
from training import image_io
from training import sampling

config_mod.register()

SOLVERS = ('heun',)
FORMATS = ('png', 'npz')

#----------------------------------------------------------------------------

def generate_images(
    net,                        # Network (EMA) from a snapshot.
    seeds,                      # Seeds of this process, split into batches (list of lists).
    device,                     # Device to run on.
    class_idx   = None,         # Class label, None = random.
    sampler_kwargs = {},        # Arguments of sampling.edm_sampler.
):
    """Yield (seeds, images float32 [B, C, H, W] in [-1, 1]-ish units) per batch."""
    for batch_seeds in seeds:
        if len(batch_seeds) == 0:
            continue
        rnd = sampling.StackedRandomGenerator(device, batch_seeds)
        latents = rnd.randn([len(batch_seeds), net.img_channels, net.img_resolution, net.img_resolution], device=device)
        class_labels = None
        if net.label_dim:
            class_labels = torch.eye(net.label_dim, device=device)[rnd.randint(net.label_dim, size=[len(batch_seeds)], device=device)]
            if class_idx is not None:
                class_labels[:, :] = 0
                class_labels[:, class_idx] = 1
        images = sampling.edm_sampler(net, latents, class_labels=class_labels, randn_like=rnd.randn_like, **sampler_kwargs)
        yield batch_seeds, images.to(torch.float32)

#----------------------------------------------------------------------------

def _check(scfg: dict) -> list[int]:
    if not scfg['network_pkl']:
        raise ValueError('sampling.network_pkl is required: the network-snapshot-*.pkl to sample from')
    if scfg['solver'] not in SOLVERS:
        raise ValueError(f'sampling.solver: unknown solver {scfg["solver"]!r} (choose from {", ".join(SOLVERS)})')
    if scfg['format'] not in FORMATS:
        raise ValueError(f'sampling.format: expected one of {", ".join(FORMATS)}, got {scfg["format"]!r}')
    if scfg['num_steps'] < 1:
        raise ValueError(f'sampling.num_steps must be >= 1, got {scfg["num_steps"]}')
    if scfg['batch'] < 1:
        raise ValueError(f'sampling.batch must be >= 1, got {scfg["batch"]}')
    seeds = misc.parse_int_list(scfg['seeds'], 'sampling.seeds')
    if len(seeds) == 0:
        raise ValueError('sampling.seeds: no seeds given')
    if len(set(seeds)) != len(seeds):
        raise ValueError('sampling.seeds: seeds repeat')
    return seeds

def run(cfg: DictConfig) -> None:
    config_mod.check_keys(cfg)
    scfg = config_mod.to_plain(cfg.sampling)
    seeds = _check(scfg)
    dist.init()
    device = dist.get_device()
    rank, world_size = dist.get_rank(), dist.get_world_size()

    # Load network.
    dist.print0(f'Loading network from "{scfg["network_pkl"]}"...')
    net = persistence.load_snapshot(scfg['network_pkl'])['ema'].eval().requires_grad_(False).to(device)
    if scfg['batch_invariant']:
        net = sampling.PerSampleNet(net)
    if scfg['class_idx'] is not None and not (0 <= scfg['class_idx'] < max(net.label_dim, 0)):
        raise ValueError(f'sampling.class_idx={scfg["class_idx"]}: the network has {net.label_dim} classes')
    if getattr(net, 'cond_channels', 0):
        raise ValueError('this network needs condition images (cond_channels > 0); generate.py samples unconditional and class-conditional networks')

    # Output location.
    outdir = scfg['outdir'] or os.path.splitext(scfg['network_pkl'])[0] + '-samples'
    if rank == 0:
        os.makedirs(outdir, exist_ok=True)
    dist.barrier()

    # Generate.
    batches = sampling.split_seeds(seeds, scfg['batch'], rank, world_size)
    sampler_kwargs = {k: scfg[k] for k in ('num_steps', 'sigma_min', 'sigma_max', 'rho', 'S_churn', 'S_min', 'S_max', 'S_noise')}
    dist.print0(f'Generating {len(seeds)} images to "{outdir}"...')
    results = []
    for i, (batch_seeds, images) in enumerate(generate_images(net, batches, device, scfg['class_idx'], sampler_kwargs)):
        images = images.cpu().numpy()
        if scfg['format'] == 'png':
            for seed, image in zip(batch_seeds, images):
                folder = os.path.join(outdir, f'{seed - seed % 1000:06d}') if scfg['subdirs'] else outdir
                os.makedirs(folder, exist_ok=True)
                image_io.save_png(image, os.path.join(folder, f'{seed:06d}.png'))
        else:
            results.append((batch_seeds, images))
        dist.print0(f'batch {i + 1}/{len(batches)} ({len(batch_seeds)} images on rank 0)')

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
    dist.barrier()
    dist.print0('Done.')

#----------------------------------------------------------------------------

@hydra.main(version_base='1.3', config_path='configs', config_name=None)
def main(cfg: DictConfig) -> None:
    """Entry point: generate with the experiment config `-cn=<name>` and `sampling.*` overrides."""
    try:
        run(cfg)
    except (ValueError, FileNotFoundError) as err:
        prefix = f'[rank {dist.get_rank()}] ' if dist.get_world_size() > 1 else ''
        print(f'{prefix}error: {err}', file=sys.stderr)
        dist.shutdown(1)
    dist.shutdown(0)

if __name__ == '__main__':
    config_mod.prepare_hydra_argv()
    main()

#----------------------------------------------------------------------------
