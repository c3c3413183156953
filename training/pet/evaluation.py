# medEDM: diffusion-model training toolkit for medical imaging.

"""`evaluate.py pet`: PSNR, SSIM and NRMSE of the EDM posterior mean against
the low-dose MLEM and three classical baselines, each tuned on the validation
split on a fine grid separately per metric, reference and region
(training/pet/baselines.py: Gaussian post-filter, early-stopped MLEM, MAP-EM
with a quadratic prior; the last two need the npz's `low_counts`), against the
full-dose MLEM and against the phantom, over the whole image and inside the
brain support (phantom > 0), with paired differences over test images (mean
and standard error) and the calibration of the posterior std.

Data range (PSNR and SSIM): per image, max - min of the reference image
(full-dose MLEM or phantom, in counts per pixel), for both regions. Posterior
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
from training.pet import baselines
from training.pet.dataset import pet_denormalize, pet_normalize, pet_scale

SPLIT_ARRAYS = ('full', 'low', 'phantom_counts')
OPTIONAL_ARRAYS = ('lesions', 'low_counts', 'dose_fraction', 'n_iter') # Newer pet-data splits: lesion contrast, reconstruction baselines.
METRICS      = dict(psnr=True, ssim=True, nrmse=False)               # Metric: higher is better.
REFERENCES   = ('full_dose_mlem', 'phantom')
REGIONS      = ('image', 'brain')
NOT_BASELINES = ('low_dose_mlem', 'supervised_unet', 'oracle_bound') # Rows never picked as "the best classical baseline".

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
            data = {k: npz[k] for k in SPLIT_ARRAYS + OPTIONAL_ARRAYS if k in npz.files}
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
    if 'lesions' in data:                                               # Lesion labels (0 none, 1 hot, 2 cold).
        if data['lesions'].shape != full.shape:
            raise ValueError(f'{option}: lesions {data["lesions"].shape} do not match full {full.shape} in {path}')
        out['lesions'] = data['lesions'][:n]
    if 'low_counts' in data:                                            # The reconstruction baselines' input.
        counts = data['low_counts']
        if counts.ndim != 3 or len(counts) != len(full) or 'dose_fraction' not in data or 'n_iter' not in data:
            raise ValueError(f'{option}: low_counts {counts.shape} in {path} must be [N, angles, bins] with N = {len(full)}, '
                f'beside dose_fraction and n_iter; rebuild it with dataset_tool.py pet-data')
        out.update(low_counts=counts[:n].astype(np.float64), dose_fraction=float(data['dose_fraction']), n_iter=int(data['n_iter']))
    for k in SPLIT_ARRAYS:
        if not np.issubdtype(data[k].dtype, np.number):
            raise ValueError(f'{option}: {k} in {path} must be numeric, got {data[k].dtype}')
        out[k] = data[k][:n].astype(np.float64)
        bad = np.flatnonzero(~np.isfinite(out[k]).reshape(n, -1).all(1))
        if len(bad):
            raise ValueError(f'{option}: {k} in {path} holds NaN or Inf values (image {int(bad[0])}); rebuild it with dataset_tool.py pet-data')
    return out

#----------------------------------------------------------------------------
# Per-image scores: every metric, against one reference, over one region.

def data_range(ref: np.ndarray) -> np.ndarray:
    flat = ref.reshape(len(ref), -1)
    return flat.max(1) - flat.min(1)

def references(split: dict) -> dict:
    return {'full_dose_mlem': split['full'], 'phantom': split['phantom_counts']}

def region_mask(split: dict, region: str) -> np.ndarray | None:
    return None if region == 'image' else split['phantom_counts'] > 0   # The brain support, from the phantom.

def scores(images: np.ndarray, ref: np.ndarray, mask: np.ndarray | None) -> dict:
    """{metric: per-image values [N]}."""
    out = {k: [] for k in METRICS}
    for i, r in enumerate(data_range(ref)):
        m = None if mask is None else mask[i]
        out['psnr'].append(metrics.psnr(images[i], ref[i], float(r), mask=m)[0])
        out['ssim'].append(metrics.ssim(images[i], ref[i], float(r), mask=m)[0])
        out['nrmse'].append(metrics.nrmse(images[i], ref[i], mask=m)[0])
    return {k: np.array(v) for k, v in out.items()}

#----------------------------------------------------------------------------
# The baselines: each parameter scored on validation, the parameter tuned per
# (reference, region, metric), the test images and scores at the chosen ones.

def baseline_runs(val: dict, test: dict, sm) -> dict:
    """{name: (parameter name, run(split, consume, params=None))}: params None = the whole grid (baselines.py);
    `sm` the system matrix (None: no low_counts, no MLEM-based baselines)."""
    out = {'low_dose_mlem_gauss': ('sigma_px', lambda split, consume, params=None:
        baselines.gauss_candidates(split, consume, baselines.GAUSS_SIGMAS if params is None else sorted(params)))}
    if 'low_counts' in val and 'low_counts' in test:
        out['low_dose_mlem_early'] = ('iterations', lambda split, consume, params=None:
            baselines.mlem_early_candidates(split, sm, consume, range(1, split['n_iter'] + 1) if params is None else params))
        out['low_dose_map_em'] = ('beta', lambda split, consume, params=None:
            baselines.map_em_candidates(split, sm, split['n_iter'], consume, baselines.MAP_BETAS if params is None else sorted(params)))
    return out

def tuned_scores(val: dict, test: dict, run) -> tuple[dict, dict, dict]:
    """Test scores {(ref, region): {metric: [N]}} at the parameters chosen on validation, those choices,
    and the test images at the parameter chosen for PSNR against the full-dose MLEM (lesions, sharpness)."""
    val_scores = {}
    run(val, lambda p, img: val_scores.__setitem__(p, {(ref, region): scores(img, references(val)[ref], region_mask(val, region))
        for ref in REFERENCES for region in REGIONS}))
    chosen = {}
    for ref in REFERENCES:
        for region in REGIONS:
            for metric, higher in METRICS.items():
                p, at_edge = baselines.tune({q: float(v[(ref, region)][metric].mean()) for q, v in val_scores.items()}, higher)
                chosen[f'{ref}/{region}/{metric}'] = p
                if at_edge:
                    print(f'Note: the parameter chosen for {ref}/{region}/{metric}, {p}, is at an end of its grid')
    test_images = {}
    run(test, test_images.__setitem__, params=set(chosen.values()))
    needed = {(chosen[f'{ref}/{region}/{metric}'], ref, region) for ref in REFERENCES for region in REGIONS for metric in METRICS}
    test_scores = {(p, ref, region): scores(test_images[p], references(test)[ref], region_mask(test, region))  # Every metric
        for p, ref, region in needed}                                                                          # at once.
    out = {(ref, region): {metric: test_scores[(chosen[f'{ref}/{region}/{metric}'], ref, region)][metric] for metric in METRICS}
        for ref in REFERENCES for region in REGIONS}
    return out, chosen, test_images[chosen['full_dose_mlem/image/psnr']]

#----------------------------------------------------------------------------
# Paired differences over test images: mean and standard error of the mean.

def paired(a: np.ndarray, b: np.ndarray) -> dict:
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float('nan')
    return dict(mean=float(d.mean()), se=se, n=len(d), wins=int((d > 0).sum()))

#----------------------------------------------------------------------------
# Posterior samples of the conditional EDM: S seeds per condition, batched.

@torch.no_grad()
def pet_posterior(net, low: np.ndarray, samples: int, batch: int, device, seed: int = 0, sigma_start: float | None = None,
        **sampler_kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Return the posterior mean, std and the first sample of each condition [N,1,R,R], in counts per pixel.
    sigma_start: start at the condition noised to this level (partial-noise reconstruction,
    sampling.reconstruct) instead of at pure noise; None = pure noise."""
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
        if sigma_start is None:
            x = sampling.sample(net, latents, cond=cond[idx].to(device), randn_like=rnd.randn_like, **sampler_kwargs)
        else:
            x = sampling.reconstruct(net, cond[idx].to(device), latents, sigma_start, cond=cond[idx].to(device), randn_like=rnd.randn_like, **sampler_kwargs)
        out.append(pet_denormalize(x.cpu().double(), scale[idx].double()).numpy())
    draws = np.concatenate(out).reshape(len(low), samples, *low.shape[1:])
    return (*sampling.posterior_stats(draws, axis=1), draws[:, 0])

#----------------------------------------------------------------------------
# What a mean cannot show: lesion contrast and sharpness, per image.
#   contrast recovery  CR = (C - 1) / (C_phantom - 1), C = mean(lesion) / mean(ring),
#                      the ring: 2 px around the lesions of one kind, inside the brain,
#                      outside every lesion (1 = the phantom's contrast kept, 0 = lost);
#   sharpness          HF(x) / HF(full-dose MLEM), HF = energy of x - G_1px(x) in the brain.

def lesion_contrast(images: np.ndarray, split: dict) -> dict:
    """{'hot': [N], 'cold': [N]} contrast recovery (NaN where an image has no such lesion)."""
    out = {}
    for kind, label in (('hot', 1), ('cold', 2)):
        values = []
        for i in range(len(images)):
            lesion = split['lesions'][i, 0] == label
            ring = ndimage.binary_dilation(lesion, iterations=2) & (split['lesions'][i, 0] == 0) & (split['phantom_counts'][i, 0] > 0)
            if lesion.sum() < 4 or ring.sum() < 4:
                values.append(np.nan)
                continue
            contrast = lambda x: x[lesion].mean() / max(x[ring].mean(), 1e-12)
            values.append((contrast(images[i, 0]) - 1) / (contrast(split['phantom_counts'][i, 0]) - 1))
        out[kind] = np.array(values)
    return out

def high_frequency_ratio(images: np.ndarray, split: dict) -> np.ndarray:
    brain = split['phantom_counts'] > 0
    hf = lambda x: ((x - ndimage.gaussian_filter(x, sigma=(0, 0, 1, 1))) ** 2 * brain).reshape(len(x), -1).sum(1)
    return hf(images) / hf(split['full'])

def lesions_and_sharpness(methods: dict, split: dict) -> dict:
    out = {}
    for name, images in methods.items():
        entry = dict(high_frequency_ratio=float(high_frequency_ratio(images, split).mean()))
        if 'lesions' in split:
            for kind, v in lesion_contrast(images, split).items():
                entry[f'{kind}_contrast_recovery'] = float(np.nanmean(v)) if np.isfinite(v).any() else float('nan')
                entry[f'{kind}_images'] = int(np.isfinite(v).sum())
        out[name] = entry
    return out

#----------------------------------------------------------------------------
# The supervised U-Net (a snapshot trained with training.loss.RegressionLoss,
# configs/pet_supervised.yaml): one network call per condition.

@torch.no_grad()
def pet_supervised(net, loss_fn, low: np.ndarray, batch: int, device) -> np.ndarray:
    low_t = torch.as_tensor(low, dtype=torch.float32)
    scale = pet_scale(low_t)
    cond = pet_normalize(low_t, scale)
    out = []
    for start in range(0, len(low), batch):
        c = cond[start:start + batch].to(device)
        x = loss_fn.predict(net, torch.zeros([len(c), *sampling.sample_shape(net)], device=device), cond=c)
        out.append(pet_denormalize(x.cpu().double(), scale[start:start + batch].double()).numpy())
    return np.concatenate(out)

def load_supervised(path: str, trust_edm_pickle: bool, device, shape: tuple) -> tuple:
    net, snapshot = evaluation.load_network(path, trust_edm_pickle, device)
    loss_fn = snapshot.get('loss_fn')
    if not callable(getattr(loss_fn, 'predict', None)):
        raise ValueError(f'--supervised: {path} was not trained with training.loss.RegressionLoss '
            f'(its loss is {type(loss_fn).__name__}); train one with -cn=pet_supervised')
    if getattr(net, 'cond_channels', 0) != 1 or tuple(sampling.sample_shape(net)) != shape:
        raise ValueError(f'--supervised: {path} takes images of {tuple(sampling.sample_shape(net))} with '
            f'{getattr(net, "cond_channels", 0)} condition channels; the EDM network takes {shape} with 1')
    return net, loss_fn

#----------------------------------------------------------------------------
# Every method against both references over both regions: summary (mean, std),
# rows for metrics.csv, paired differences of the EDM mean against each baseline
# and against the best one (best by its test mean: the baseline's most favourable case).

def compare(per_method: dict, images: int) -> tuple[dict, list[dict], dict]:
    summary, rows, diffs = {region: {} for region in REGIONS}, [], {region: {} for region in REGIONS}
    for (method, ref, region), sc in per_method.items():
        summary[region][f'{method}_vs_{ref}'] = {k: dict(mean=float(v.mean()), std=float(v.std())) for k, v in sc.items()}
        rows += [dict(image=i, method=method, reference=ref, region=region, **{k: float(v[i]) for k, v in sc.items()}) for i in range(images)]
    methods = sorted({m for m, _, _ in per_method} - {'edm_posterior_mean'})
    for ref in REFERENCES:
        for region in REGIONS:
            edm = per_method[('edm_posterior_mean', ref, region)]
            for metric, higher in METRICS.items():
                sign = 1 if higher else -1                                  # Positive = the EDM mean is better.
                for m in methods:
                    diffs[region].setdefault(f'edm_minus_{m}_vs_{ref}', {})[metric] = paired(sign * edm[metric], sign * per_method[(m, ref, region)][metric])
                best = max((m for m in methods if m not in NOT_BASELINES), key=lambda m: sign * per_method[(m, ref, region)][metric].mean())
                diffs[region].setdefault(f'edm_minus_best_baseline_vs_{ref}', {})[metric] = dict(
                    paired(sign * edm[metric], sign * per_method[(best, ref, region)][metric]), baseline=best)
    return summary, rows, diffs

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
@click.option('--val-data',              help='Validation split, to tune the baselines (filter width, iterations, MAP-EM strength)', metavar='NPZ', type=str, required=True)
@click.option('--samples',               help='Posterior samples per condition (2 or more: the posterior std)', metavar='INT', type=click.IntRange(min=2), default=8, show_default=True)
@click.option('--max-images',            help='Evaluate at most this many test images', metavar='INT',      type=click.IntRange(min=1), default=None)
@click.option('--panel-images',          help='Cases shown in panel.png', metavar='INT',                    type=click.IntRange(min=1), default=6, show_default=True)
@click.option('--supervised',            help='Snapshot of the supervised U-Net baseline (-cn=pet_supervised)', metavar='PKL', type=str, default=None)
@click.option('--sigma-start',           help='Start the sampler at the condition noised to this sigma (partial noise; replaces --sigma-max); default: pure noise', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=None)
@click.option('--oracle-draws',          help='Draws of the oracle bound (needs low_counts; 0 = none)', metavar='INT', type=click.IntRange(min=0), default=32, show_default=True)
@click.option('--cache-dir',             help='Projector cache folder (MLEM and MAP-EM baselines)', metavar='PATH', type=str, default='projector_matrices', show_default=True)
@evaluation.sampler_options
def command(network_pkl, trust_edm_pickle, outdir, batch, seed, data, val_data, samples, max_images, panel_images, supervised, sigma_start, oracle_draws, cache_dir, sampler):
    """PET dose enhancement: PSNR, SSIM and NRMSE of the EDM posterior mean,
    the low-dose MLEM and three baselines tuned on --val-data (Gaussian filter,
    early-stopped MLEM, MAP-EM), against the full-dose MLEM and the phantom,
    whole image and brain, with paired differences and posterior calibration.

    With low_counts in the splits, also the oracle bound (--oracle-draws): the
    conditional mean of the full-dose MLEM given the low-dose counts and the
    phantom, the ceiling of any method against the full-dose MLEM.

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
    if sigma_start is not None:                                         # sampling.sample's checks, before anything is written.
        if sampler['afs'] or sampler.get('preset') is not None:         # (So sigma_min is a number below: no preset's multiple.)
            raise ValueError('--sigma-start: the analytic first step (--afs, and --preset fast, which sets it) assumes pure noise; '
                'partial-noise starts need --no-afs without --preset')
        lo = max(float(sampler['sigma_min']), float(net.sigma_min))
        if not lo < sigma_start <= float(net.sigma_max):
            raise ValueError(f'--sigma-start: expected a noise level in ({lo}, {float(net.sigma_max)}] (above --sigma-min), got {sigma_start}')
    for key in ('n_iter', 'dose_fraction'):                            # Candidates of both splits must be comparable.
        if key in val and key in test and val[key] != test[key]:
            raise ValueError(f'--val-data: {val_data} was built with {key}={val[key]}, --data {data} with {key}={test[key]}; '
                f'build both with the same dataset_tool.py pet-data settings')
    sup = load_supervised(supervised, trust_edm_pickle, device, shape) if supervised is not None else None
    evaluation.make_outdir(outdir)

    # Methods.
    print(f'Sampling {samples} posterior samples for each of {len(test["low"])} conditions '
        f'({sampler["solver"]}, {sampler["discretization"]}, {sampler["num_steps"]} steps)...')
    mean, std, sample = pet_posterior(net, test['low'], samples, batch, device, seed=seed, sigma_start=sigma_start, **sampler)
    print('Tuning the baselines on the validation split (per metric, reference and region)...')
    sm = None
    if 'low_counts' in test and ('low_counts' in val or oracle_draws):      # Loaded once for the baselines and the oracle.
        from tomography_utils.projector import get_system_matrix
        sm = get_system_matrix(test['low'].shape[-1], cache_dir=cache_dir)
    runs = baseline_runs(val, test, sm)
    if 'low_dose_mlem_early' not in runs:
        print('No low_counts in the splits (built before they were stored): early-stopped MLEM and MAP-EM are skipped')
    per_method, chosen, test_images = {}, {}, {}
    for name, (param, run) in runs.items():
        tuned, picks, test_images[name] = tuned_scores(val, test, run)
        chosen[name] = dict(parameter=param, chosen=picks)
        per_method.update({(name, ref, region): sc for (ref, region), sc in tuned.items()})
    fixed = [('low_dose_mlem', test['low']), ('edm_posterior_mean', mean)]
    if sup is not None:
        fixed.append(('supervised_unet', pet_supervised(*sup, test['low'], batch, device)))
    if oracle_draws and 'low_counts' in test:                               # The ceiling vs the full-dose MLEM (baselines.py).
        print(f'Oracle bound: {oracle_draws} full-dose draws given the low-dose counts and the phantom...')
        oracle = baselines.oracle_full_dose_mean(test, sm, oracle_draws, seed=seed)
        fixed.append(('oracle_bound', oracle))
    for method, images in fixed:
        per_method.update({(method, ref, region): scores(images, references(test)[ref], region_mask(test, region))
            for ref in REFERENCES for region in REGIONS})
    summary, rows, diffs = compare(per_method, len(test['low']))
    shown = {k: v for k, v in fixed if k != 'oracle_bound'}                  # Lesions and sharpness: the baselines at their
    shown.update(test_images)                                               # PSNR-optimal parameter.
    shown['edm_posterior_sample'] = sample
    detail = lesions_and_sharpness(shown, test)
    cal = {f'vs_{ref}/{region}': metrics.calibration(mean, std, references(test)[ref], mask=region_mask(test, region), samples=samples)
        for ref in REFERENCES for region in REGIONS}

    # Results.
    result = dict(network=network_pkl, supervised=supervised, data=data, val_data=val_data, images=len(test['low']), samples=samples, seed=seed, sampler=sampling.network_levels(sampler, net),
        sigma_start=sigma_start,
        baselines=chosen, data_range='per image: max - min of the reference image (counts per pixel), both regions',
        regions=dict(image='whole image', brain='phantom > 0'), ssim='Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03',
        metrics=summary['image'], metrics_brain=summary['brain'], paired=diffs, calibration=cal, lesions_and_sharpness=detail,
        lesions_note='contrast recovery (C - 1) / (C_phantom - 1) against a 2 px ring; high_frequency_ratio = HF(x) / HF(full-dose MLEM) '
            'in the brain; baselines at their PSNR-optimal parameter (vs full-dose MLEM, whole image)',
        paired_note='edm minus baseline; for nrmse the sign is flipped so that positive = the EDM mean is better; se = standard error of the mean')
    if 'oracle_bound' in dict(fixed):
        result['oracle_note'] = (f'oracle_bound: mean of {oracle_draws} full-dose MLEMs of the low-dose counts plus fresh Poisson((1 - f) A phantom) '
            'counts; it knows the phantom: a ceiling in expected MSE against the full-dose MLEM, not a method (training/pet/baselines.py)')
    metrics.write_metrics(outdir, result, rows)
    write_panel(os.path.join(outdir, 'panel.png'), test, mean, std, panel_images)
    for key in ['low_dose_mlem', *runs, *(['supervised_unet'] if sup is not None else []), 'edm_posterior_mean',
            *(['oracle_bound'] if 'oracle_bound' in dict(fixed) else [])]:
        m = summary['image'][f'{key}_vs_full_dose_mlem']
        print(f'{key:<22s} vs full-dose MLEM: PSNR {m["psnr"]["mean"]:6.2f} dB  SSIM {m["ssim"]["mean"]:.4f}  NRMSE {m["nrmse"]["mean"]:.4f}')
    for ref in REFERENCES:
        d = diffs['image'][f'edm_minus_best_baseline_vs_{ref}']
        print(f'EDM mean - best baseline vs {ref}: ' + ', '.join(f'{k} {v["mean"]:+.4f} +- {v["se"]:.4f} ({v["baseline"]})' for k, v in d.items()))
    for name, d in detail.items():
        print(f'{name:<22s} ' + ', '.join(f'{k} {v:.3f}' if isinstance(v, float) else f'{k} {v}' for k, v in d.items()))
    c = cal['vs_full_dose_mlem/brain']
    print(f'Posterior std vs error (brain, vs full-dose MLEM): correlation {c["std_error_correlation"]:.3f}, '
        f'coverage +-1 std {c["coverage_1sigma"]:.3f} (calibrated: {c["calibrated_coverage_1sigma"]:.3f}), '
        f'+-2 std {c["coverage_2sigma"]:.3f} (calibrated: {c["calibrated_coverage_2sigma"]:.3f})')
    print(f'Wrote {outdir}/metrics.json, metrics.csv, panel.png (rows: phantom, low-dose MLEM, EDM mean, EDM std x4, full-dose MLEM)')

#----------------------------------------------------------------------------
