# medEDM: diffusion-model training toolkit for medical imaging.

"""Evaluate a trained network on a test split with the metrics its field reports.

Examples:

\b
# PET dose enhancement: EDM posterior mean vs low-dose MLEM and a Gaussian-filtered
# low-dose MLEM (filter width chosen on the validation split), against the
# full-dose MLEM and against the phantom:
python evaluate.py pet --network demo-runs/00000-pet64-cond-edm/network-snapshot-000008.pkl \\
    --data datasets/pet-64-test.npz --val-data datasets/pet-64-val.npz --outdir demo-runs/pet-eval

Writes metrics.json (means, std and settings), metrics.csv (one row per image
and method) and panel.png into --outdir.
"""

import csv
import io
import json
import os

import click
import numpy as np
import torch
from scipy import ndimage

from torch_utils import persistence
from training import image_io
from training import metrics
from training import sampling
from training.pet_dataset import pet_denormalize, pet_normalize, pet_scale

#----------------------------------------------------------------------------

@click.group()
def main():
    """Evaluate medEDM models: one subcommand per family."""

#----------------------------------------------------------------------------
# PET: read a pet-data npz split.

def _load_pet_split(path: str, max_images: int | None) -> dict:
    if not os.path.isfile(path):
        raise click.BadParameter(f'file not found: {path}', param_hint='--data/--val-data')
    with np.load(path, allow_pickle=False) as npz:
        missing = [k for k in ('full', 'low', 'phantom_counts') if k not in npz.files]
        if missing:
            raise click.BadParameter(f'{path} lacks arrays {missing}; build it with dataset_tool.py pet-data (without --phantoms-only)')
        n = len(npz['full']) if max_images is None else min(max_images, len(npz['full']))
        return {k: npz[k][:n].astype(np.float64) for k in ('full', 'low', 'phantom_counts')}

# Gaussian post-filter of the low-dose MLEM; the width is chosen on validation data.
def _gaussian(images: np.ndarray, sigma: float) -> np.ndarray:
    return images if sigma == 0 else ndimage.gaussian_filter(images, sigma=(0, 0, sigma, sigma))

def _data_range(ref: np.ndarray) -> np.ndarray:
    flat = ref.reshape(len(ref), -1)
    return flat.max(1) - flat.min(1)

def _per_image(metric, images: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return np.array([metric(images[i], ref[i], data_range=float(r))[0] for i, r in enumerate(_data_range(ref))])

def _choose_sigma(val: dict, candidates) -> tuple[float, dict]:
    scores = {float(s): float(_per_image(metrics.psnr, _gaussian(val['low'], s), val['full']).mean()) for s in candidates}
    return max(scores, key=scores.get), scores

# Posterior samples of the conditional EDM: S seeds per condition, batched;
# seeds as generate.py's conditional mode (condition i, draw k: seed + i * S + k).
@torch.no_grad()
def pet_posterior(net, low: np.ndarray, samples: int, batch: int, device, seed: int = 0, **sampler_kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Return the posterior mean and std [N,1,R,R] in counts per pixel."""
    low_t = torch.as_tensor(low, dtype=torch.float32)
    scale = pet_scale(low_t)
    cond = pet_normalize(low_t, scale)
    tasks = [(i, k) for i in range(len(low)) for k in range(samples)]
    out = []
    for start in range(0, len(tasks), batch):
        idx = torch.as_tensor([i for i, _ in tasks[start:start + batch]])
        rnd = sampling.StackedRandomGenerator(device, [seed + i * samples + k for i, k in tasks[start:start + batch]])
        latents = rnd.randn([len(idx), *sampling.sample_shape(net)], device=device)
        x = sampling.sample(net, latents, cond=cond[idx].to(device), randn_like=rnd.randn_like, **sampler_kwargs)
        out.append(pet_denormalize(x.cpu().double(), scale[idx].double()).numpy())
    return sampling.posterior_stats(np.concatenate(out).reshape(len(low), samples, *low.shape[1:]), axis=1)

#----------------------------------------------------------------------------

@main.command('pet')
@click.option('--network', 'network_pkl', help='Network snapshot (network-snapshot-*.pkl)', metavar='PKL',   type=str, required=True)
@click.option('--data',                  help='Test split (dataset_tool.py pet-data)', metavar='NPZ',       type=str, required=True)
@click.option('--val-data',              help='Validation split, to choose the Gaussian filter width', metavar='NPZ', type=str, required=True)
@click.option('--outdir',                help='Where to write metrics and the panel', metavar='DIR',        type=str, required=True)
@click.option('--samples',               help='Posterior samples per condition', metavar='INT',             type=click.IntRange(min=1), default=8, show_default=True)
@click.option('--solver',                help='Sampler (training.solvers)', metavar='NAME',                 type=click.Choice(['heun', 'euler', 'dpmpp_2m', 'dpmpp_3m', 'dpmpp_2m_sde']), default='heun', show_default=True)
@click.option('--discretization',        help='Time steps', metavar='NAME',                                 type=click.Choice(['edm', 'vp', 've', 'logsnr']), default='edm', show_default=True)
@click.option('--steps',                 help='Sampler steps', metavar='INT',                               type=click.IntRange(min=1), default=18, show_default=True)
@click.option('--max-images',            help='Evaluate at most this many test images', metavar='INT',      type=click.IntRange(min=1), default=None)
@click.option('--batch',                 help='Sampling batch size', metavar='INT',                         type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--panel-images',          help='Cases shown in panel.png', metavar='INT',                    type=click.IntRange(min=1), default=6, show_default=True)
def pet(network_pkl, data, val_data, outdir, samples, solver, discretization, steps, max_images, batch, panel_images):
    """PSNR, SSIM and NRMSE of low-dose MLEM, Gaussian-filtered low-dose MLEM and
    the EDM posterior mean, against the full-dose MLEM and against the phantom.

    Data range (PSNR and SSIM): per image, max - min of the reference image
    (full-dose MLEM or phantom, in counts per pixel); whole image.
    """
    device = torch.device('cuda') if torch.cuda.is_available() else torch.device('cpu')
    try:
        net = persistence.load_snapshot(network_pkl)['ema'].eval().requires_grad_(False).to(device)
    except (ValueError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from None
    if getattr(net, 'cond_channels', 0) != 1:
        raise click.ClickException(f'{network_pkl}: expected a conditional network with 1 condition channel (PET), '
            f'got cond_channels={getattr(net, "cond_channels", 0)}')
    test = _load_pet_split(data, max_images)
    val = _load_pet_split(val_data, None)
    if test['full'].shape[-1] != net.img_resolution:
        raise click.ClickException(f'{data}: images are {test["full"].shape[-1]}x{test["full"].shape[-1]}, '
            f'the network expects {net.img_resolution}x{net.img_resolution}')
    if net.img_resolution < 11: # Before sampling: SSIM's 11 x 11 window would refuse them afterwards.
        raise click.ClickException(f'{data}: images of {net.img_resolution}x{net.img_resolution} are smaller than the SSIM window (11)')
    os.makedirs(outdir, exist_ok=True)

    # Methods.
    sigma, sigma_scores = _choose_sigma(val, [0, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0])
    print(f'Gaussian filter chosen on {val_data}: sigma = {sigma} px')
    print(f'Sampling {samples} posterior samples for each of {len(test["low"])} conditions ({solver}, {discretization}, {steps} steps)...')
    mean, std = pet_posterior(net, test['low'], samples, batch, device, solver=solver, discretization=discretization, num_steps=steps)
    methods = {'low_dose_mlem': test['low'], f'low_dose_mlem_gauss': _gaussian(test['low'], sigma), 'edm_posterior_mean': mean}

    # Metrics per image.
    rows, summary = [], {}
    for ref_name, ref in (('full_dose_mlem', test['full']), ('phantom', test['phantom_counts'])):
        for method, images in methods.items():
            psnr, ssim = _per_image(metrics.psnr, images, ref), _per_image(metrics.ssim, images, ref)
            nrmse = metrics.nrmse(images, ref)
            summary[f'{method}_vs_{ref_name}'] = {name: dict(mean=float(v.mean()), std=float(v.std())) for name, v in
                (('psnr', psnr), ('ssim', ssim), ('nrmse', nrmse))}
            rows += [dict(image=i, method=method, reference=ref_name, psnr=psnr[i], ssim=ssim[i], nrmse=nrmse[i]) for i in range(len(ref))]

    # Write results.
    result = dict(network=network_pkl, data=data, val_data=val_data, images=len(test['low']), samples=samples, solver=solver, discretization=discretization, steps=steps,
        gaussian_sigma_px=sigma, gaussian_sigma_val_psnr=sigma_scores,
        data_range='per image: max - min of the reference image (counts per pixel), whole image',
        ssim='Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03', metrics=summary)
    persistence.atomic_write_bytes(os.path.join(outdir, 'metrics.json'), json.dumps(result, indent=2).encode('utf-8'))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=['image', 'method', 'reference', 'psnr', 'ssim', 'nrmse'])
    writer.writeheader()
    writer.writerows(rows)
    persistence.atomic_write_bytes(os.path.join(outdir, 'metrics.csv'), text.getvalue().encode('utf-8'))

    # Panel: columns = cases; rows = phantom / low-dose MLEM / EDM mean / EDM std / full-dose MLEM.
    k = min(panel_images, len(test['low']))
    peak = test['full'][:k].reshape(k, -1).max(1).reshape(k, 1, 1, 1)
    rows_img = [test['phantom_counts'][:k], test['low'][:k], mean[:k], std[:k] * 4, test['full'][:k]]
    panel = np.concatenate([np.clip(r / peak, 0, 1) * 2 - 1 for r in rows_img])
    image_io.save_image_grid(panel, os.path.join(outdir, 'panel.png'), grid_size=(k, len(rows_img)))
    for key in ('low_dose_mlem', 'low_dose_mlem_gauss', 'edm_posterior_mean'):
        m = summary[f'{key}_vs_full_dose_mlem']
        print(f'{key:<22s} vs full-dose MLEM: PSNR {m["psnr"]["mean"]:6.2f} dB  SSIM {m["ssim"]["mean"]:.4f}  NRMSE {m["nrmse"]["mean"]:.4f}')
    print(f'Wrote {outdir}/metrics.json, metrics.csv, panel.png (rows: phantom, low-dose MLEM, EDM mean, EDM std x4, full-dose MLEM)')

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------
