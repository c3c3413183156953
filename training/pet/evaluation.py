# medEDM: diffusion-model training toolkit for medical imaging.

"""`evaluate.py pet`: PSNR, SSIM and NRMSE of the low-dose MLEM, a
Gaussian-filtered low-dose MLEM (filter width chosen on the validation split)
and the EDM posterior mean, against the full-dose MLEM and against the
phantom, on a test split of `dataset_tool.py pet-data`.

Data range (PSNR and SSIM): per image, max - min of the reference image
(full-dose MLEM or phantom, in counts per pixel); whole image. Posterior
sample j of test image i uses seed `--seed + i * --samples + j`
(sampling.posterior_seeds, as generate.py's conditional mode)."""

import os
import zipfile

import click
import numpy as np
import torch
from scipy import ndimage

from training import evaluation
from training import image_io
from training import metrics
from training import sampling
from training.pet.dataset import pet_denormalize, pet_normalize, pet_scale

SPLIT_ARRAYS = ('full', 'low', 'phantom_counts')
SIGMA_CANDIDATES = (0, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0) # Gaussian filter widths (pixels) tried on the validation split.

#----------------------------------------------------------------------------
# Read a pet-data npz split: `full`, `low`, `phantom_counts`, all [N, 1, R, R],
# finite. Every problem is a ValueError naming the option and the file.

def load_split(path: str, max_images: int | None, option: str = '--data') -> dict:
    if not os.path.isfile(path):
        raise ValueError(f'{option}: file not found: {path}')
    if not zipfile.is_zipfile(path): # A text file, a .npy, a truncated archive.
        raise ValueError(f'{option}: {path} is not an .npz archive (or it is truncated); build it with dataset_tool.py pet-data')
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in SPLIT_ARRAYS if k in npz.files}
    except Exception as err: # pylint: disable=broad-except # Bad CRC, damaged members, pickled arrays: never a traceback.
        raise ValueError(f'{option}: cannot read {path}: damaged archive ({type(err).__name__}: {err})') from None
    missing = [k for k in SPLIT_ARRAYS if k not in data]
    if missing:
        raise ValueError(f'{option}: {path} lacks arrays {missing}; build it with dataset_tool.py pet-data (without --phantoms-only)')
    full = data['full']
    if full.ndim != 4 or full.shape[1] != 1 or full.shape[2] != full.shape[3] or len(full) == 0:
        raise ValueError(f'{option}: full in {path} must be [N, 1, R, R] with N > 0, got shape {full.shape}')
    for k in ('low', 'phantom_counts'):
        if data[k].shape != full.shape:
            raise ValueError(f'{option}: {k} {data[k].shape} does not match full {full.shape} in {path} (image count and size must agree)')
    n = len(full) if max_images is None else min(max_images, len(full))
    out = {}
    for k in SPLIT_ARRAYS:
        if not np.issubdtype(data[k].dtype, np.number):
            raise ValueError(f'{option}: {k} in {path} must be numeric, got {data[k].dtype}')
        out[k] = data[k][:n].astype(np.float64)
        bad = np.flatnonzero(~np.isfinite(out[k]).reshape(n, -1).all(1))
        if len(bad):
            raise ValueError(f'{option}: {k} in {path} holds NaN or Inf values (image {int(bad[0])}); rebuild it with dataset_tool.py pet-data')
    return out

#----------------------------------------------------------------------------
# Gaussian post-filter of the low-dose MLEM; the width is chosen on validation data.

def gaussian(images: np.ndarray, sigma: float) -> np.ndarray:
    return images if sigma == 0 else ndimage.gaussian_filter(images, sigma=(0, 0, sigma, sigma))

def data_range(ref: np.ndarray) -> np.ndarray:
    flat = ref.reshape(len(ref), -1)
    return flat.max(1) - flat.min(1)

def per_image(metric, images: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return np.array([metric(images[i], ref[i], data_range=float(r))[0] for i, r in enumerate(data_range(ref))])

def choose_sigma(val: dict, candidates=SIGMA_CANDIDATES) -> tuple[float, dict]:
    """The filter width with the best mean PSNR against the full-dose MLEM, and every width's score."""
    scores = {float(s): float(per_image(metrics.psnr, gaussian(val['low'], s), val['full']).mean()) for s in candidates}
    return max(scores, key=scores.get), scores

#----------------------------------------------------------------------------
# Posterior samples of the conditional EDM: S seeds per condition, batched.

@torch.no_grad()
def pet_posterior(net, low: np.ndarray, samples: int, batch: int, device, seed: int = 0, **sampler_kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Return the posterior mean and std [N,1,R,R] in counts per pixel."""
    low_t = torch.as_tensor(low, dtype=torch.float32)
    scale = pet_scale(low_t)
    cond = pet_normalize(low_t, scale)
    seeds = sampling.posterior_seeds(range(len(low)), samples, seed, key='--seed').reshape(-1)
    items = np.repeat(np.arange(len(low)), samples)
    out = []
    for start in range(0, len(seeds), batch):
        idx = torch.as_tensor(items[start:start + batch])
        rnd = sampling.StackedRandomGenerator(device, seeds[start:start + batch].tolist())
        latents = rnd.randn([len(idx), *sampling.sample_shape(net)], device=device)
        x = sampling.sample(net, latents, cond=cond[idx].to(device), randn_like=rnd.randn_like, **sampler_kwargs)
        out.append(pet_denormalize(x.cpu().double(), scale[idx].double()).numpy())
    return sampling.posterior_stats(np.concatenate(out).reshape(len(low), samples, *low.shape[1:]), axis=1)

#----------------------------------------------------------------------------
# Metrics of every method against both references: rows (image, method,
# reference) for metrics.csv and means / stds for metrics.json.

def score(methods: dict, references: dict) -> tuple[list[dict], dict]:
    rows, summary = [], {}
    for ref_name, ref in references.items():
        for method, images in methods.items():
            psnr, ssim, nrmse = per_image(metrics.psnr, images, ref), per_image(metrics.ssim, images, ref), metrics.nrmse(images, ref)
            summary[f'{method}_vs_{ref_name}'] = {name: dict(mean=float(v.mean()), std=float(v.std())) for name, v in
                (('psnr', psnr), ('ssim', ssim), ('nrmse', nrmse))}
            rows += [dict(image=i, method=method, reference=ref_name, psnr=psnr[i], ssim=ssim[i], nrmse=nrmse[i]) for i in range(len(ref))]
    return rows, summary

# Panel: columns = cases; rows = phantom / low-dose MLEM / EDM mean / EDM std x4 / full-dose MLEM, each case scaled to its full-dose peak.
def write_panel(path: str, test: dict, mean: np.ndarray, std: np.ndarray, cases: int) -> None:
    k = min(cases, len(test['low']))
    peak = test['full'][:k].reshape(k, -1).max(1).reshape(k, 1, 1, 1)
    rows = [test['phantom_counts'][:k], test['low'][:k], mean[:k], std[:k] * 4, test['full'][:k]]
    panel = np.concatenate([np.clip(r / peak, 0, 1) * 2 - 1 for r in rows])
    image_io.save_image_grid(panel, path, grid_size=(k, len(rows)))

#----------------------------------------------------------------------------

@click.command('pet')
@evaluation.common_options
@click.option('--data',                  help='Test split (dataset_tool.py pet-data)', metavar='NPZ',       type=str, required=True)
@click.option('--val-data',              help='Validation split, to choose the Gaussian filter width', metavar='NPZ', type=str, required=True)
@click.option('--samples',               help='Posterior samples per condition', metavar='INT',             type=click.IntRange(min=1), default=8, show_default=True)
@click.option('--max-images',            help='Evaluate at most this many test images', metavar='INT',      type=click.IntRange(min=1), default=None)
@click.option('--panel-images',          help='Cases shown in panel.png', metavar='INT',                    type=click.IntRange(min=1), default=6, show_default=True)
@evaluation.sampler_options
def command(network_pkl, trust_edm_pickle, outdir, batch, seed, data, val_data, samples, max_images, panel_images, sampler):
    """PET dose enhancement: PSNR, SSIM and NRMSE of low-dose MLEM,
    Gaussian-filtered low-dose MLEM and the EDM posterior mean, against the
    full-dose MLEM and against the phantom.

    Data range (PSNR and SSIM): per image, max - min of the reference image
    (full-dose MLEM or phantom, in counts per pixel); whole image. Writes
    metrics.json, metrics.csv and panel.png into --outdir.
    """
    # Every input is checked before anything is sampled or written.
    evaluation.check_outdir(outdir)
    test = load_split(data, max_images, '--data')
    val = load_split(val_data, None, '--val-data')
    sampling.posterior_seeds(range(len(test['low'])), samples, seed, key='--seed')
    device = evaluation.default_device()
    net, _ = evaluation.load_network(network_pkl, trust_edm_pickle, device)
    if getattr(net, 'cond_channels', 0) != 1:
        raise ValueError(f'{network_pkl}: expected a conditional network with 1 condition channel (PET), '
            f'got cond_channels={getattr(net, "cond_channels", 0)}')
    shape = tuple(sampling.sample_shape(net))
    for option, path, split in (('--data', data, test), ('--val-data', val_data, val)):
        if split['full'].shape[1:] != shape:
            raise ValueError(f'{option}: images in {path} are {split["full"].shape[1:]}, the network expects {shape}')
    if min(shape[1:]) < 11: # SSIM's 11 x 11 window would refuse them after sampling.
        raise ValueError(f'{data}: images of {shape[-2]}x{shape[-1]} are smaller than the SSIM window (11)')
    sampling.check_guidance(net, sampler['guidance'], key='--guidance')
    evaluation.make_outdir(outdir)

    # Methods.
    sigma, sigma_scores = choose_sigma(val)
    print(f'Gaussian filter chosen on {val_data}: sigma = {sigma} px')
    print(f'Sampling {samples} posterior samples for each of {len(test["low"])} conditions '
        f'({sampler["solver"]}, {sampler["discretization"]}, {sampler["num_steps"]} steps)...')
    mean, std = pet_posterior(net, test['low'], samples, batch, device, seed=seed, **sampler)
    methods = {'low_dose_mlem': test['low'], 'low_dose_mlem_gauss': gaussian(test['low'], sigma), 'edm_posterior_mean': mean}
    rows, summary = score(methods, {'full_dose_mlem': test['full'], 'phantom': test['phantom_counts']})

    # Results.
    result = dict(network=network_pkl, data=data, val_data=val_data, images=len(test['low']), samples=samples, seed=seed, sampler=sampler,
        gaussian_sigma_px=sigma, gaussian_sigma_val_psnr=sigma_scores,
        data_range='per image: max - min of the reference image (counts per pixel), whole image',
        ssim='Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03', metrics=summary)
    metrics.write_metrics(outdir, result, rows)
    write_panel(os.path.join(outdir, 'panel.png'), test, mean, std, panel_images)
    for key in methods:
        m = summary[f'{key}_vs_full_dose_mlem']
        print(f'{key:<22s} vs full-dose MLEM: PSNR {m["psnr"]["mean"]:6.2f} dB  SSIM {m["ssim"]["mean"]:.4f}  NRMSE {m["nrmse"]["mean"]:.4f}')
    print(f'Wrote {outdir}/metrics.json, metrics.csv, panel.png (rows: phantom, low-dose MLEM, EDM mean, EDM std x4, full-dose MLEM)')

#----------------------------------------------------------------------------
