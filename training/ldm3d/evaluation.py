# medEDM: diffusion-model training toolkit for medical imaging.

"""`evaluate.py inpaint`: inpaint BraTS-layout cases with a stage-2 LDM
snapshot and score it, and two baselines, with the official BraTS 2023
inpainting metrics.

Per (case, mask): S seeds (seed + i * S + j, sampling.posterior_seeds) ->
S inpainted volumes, each pasted into the voided input; their voxel-wise
mean is the prediction <case>-t1n-inference-XXXX.nii.gz, their voxel-wise
standard deviation <case>-t1n-inference-std-XXXX.nii.gz (float32, the
voided input's header). Baselines: `mean_fill` (the mean of the known brain
voxels) and `diffusion_fill` (the harmonic function inside the mask with the
voided image's values on its border: Laplace's equation, 6-neighbour). A
reference row, `ae_bound`, is the autoencoder's own reconstruction of the
ground truth pasted into the voided input: it uses the ground truth, so it
is no method but the bound of stage 1 on what any latent model can reach.
With a conditional decoder, `decoder_only` decodes the voided image's own
latent with the decoder's condition (no diffusion): what stage 2 adds.

Metrics: inpainting.challenge_metrics_2023.generate_metrics, fed exactly as
its compute_image_quality_metrics does, from the NIfTI files written
(prediction, mask, ground truth, voided image), so the numbers are the
package's: SSIM, PSNR, MSE (and RMSE, MAE, MSLE, PSNR variants) inside the
mask after its percentile normalisation by the voided image. The summary
holds each method's mean and standard deviation and the paired difference
model - baseline with its standard error (std / sqrt(n)), ae_bound -
diffusion_fill and ldm - decoder_only."""

import os

import click
import numpy as np
import torch

from training import evaluation
from training import image_io
from training import metrics
from training import sampling
from training.ldm3d import data as ldm_data
from training.ldm3d import latent as ldm_latent
from training.ldm3d import nifti

METHODS = ('ldm', 'mean_fill', 'diffusion_fill')
AE_BOUND = 'ae_bound'                   # The autoencoder's reconstruction of the ground truth, pasted: a bound, not a method.
DECODER_ONLY = 'decoder_only'           # The voided image's latent decoded (no diffusion): what stage 2 adds.
REFERENCES = (AE_BOUND, DECODER_ONLY)
REPORTED = ('ssim', 'psnr', 'mse')
ALL_METRICS = ('ssim', 'psnr', 'mse', 'rmse', 'mae', 'msle', 'psnr_eps', 'psnr_01', 'psnr_01_eps')

#----------------------------------------------------------------------------
# The official metrics, from files, as the package's compute_image_quality_metrics reads them (without its prints).

def official_metrics(prediction: str, mask: str, t1n: str, voided: str) -> dict:
    from inpainting import challenge_metrics_2023 as cm
    return cm.generate_metrics(prediction=cm.read_nifti_to_tensor(prediction), target=cm.read_nifti_to_tensor(t1n),
        normalization_tensor=cm.read_nifti_to_tensor(voided), mask=cm.read_nifti_to_tensor(mask).bool())

#----------------------------------------------------------------------------
# Baselines.

def mean_fill(voided: np.ndarray, mask: np.ndarray) -> np.ndarray:
    known = voided[(voided != 0) & ~mask]
    return ldm_latent.paste(voided, mask, np.full(voided.shape, known.mean() if known.size else 0, dtype=np.float32))

def diffusion_fill(voided: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Harmonic fill (ldm_data.harmonic_fill): sum over the 6 neighbours (u_n - u_p) = 0 inside the mask, u = voided outside."""
    return ldm_latent.paste(voided, mask, ldm_data.harmonic_fill(voided, mask))

#----------------------------------------------------------------------------
# Panel: three orthogonal slices through the mask centre; columns voided /
# inpainted / ground truth / mask / spread (x4), rows the three planes.

def _plane(x: np.ndarray, axis: int, c) -> np.ndarray:
    return np.take(x, int(c[axis]), axis=axis)

def write_panel(path: str, case: dict, pred: np.ndarray, spread: np.ndarray) -> None:
    c = np.argwhere(case['mask']).mean(0).round().astype(int)
    s = max(case['scale'], 1e-12)
    cols = [case['voided'] / s, pred / s, case.get('t1n', np.zeros_like(pred)) / s, case['mask'].astype(np.float32), 4 * spread / s]
    S = max(case['mask'].shape)
    panel = np.zeros([3 * S, len(cols) * S], dtype=np.float32)
    for r in range(3):
        for j, vol in enumerate(cols):
            tile = np.rot90(_plane(vol, r, c))
            panel[r * S:r * S + tile.shape[0], j * S:j * S + tile.shape[1]] = tile
    image_io.save_png(np.clip(panel, 0, 1)[None], path, drange=(0, 1))

#----------------------------------------------------------------------------
# Summary: mean / std per method and metric; paired differences ldm - baseline.

def summarize(rows: list[dict]) -> dict:
    out = {}
    for method in METHODS + REFERENCES:
        r = [row for row in rows if row['method'] == method]
        if r:
            out[method] = {m: dict(mean=float(np.mean([x[m] for x in r])), std=float(np.std([x[m] for x in r]))) for m in ALL_METRICS}
    paired = {}
    for first, base in [('ldm', b) for b in METHODS[1:]] + [(AE_BOUND, 'diffusion_fill'), ('ldm', DECODER_ONLY)]:
        model = {(row['case'], row['mask']): row for row in rows if row['method'] == first}
        pairs = [(model[(row['case'], row['mask'])], row) for row in rows if row['method'] == base and (row['case'], row['mask']) in model]
        if not pairs:
            continue
        paired[f'{first}-{base}'] = {}
        for m in REPORTED:
            d = np.array([a[m] - b[m] for a, b in pairs], dtype=np.float64)
            d = d[np.isfinite(d)]
            se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float('nan')
            paired[f'{first}-{base}'][m] = dict(mean_diff=float(d.mean()) if len(d) else float('nan'), se=se, n=int(len(d)),
                wins=int((d > 0).sum() if m != 'mse' else (d < 0).sum()))
    out['paired'] = paired
    return out

#----------------------------------------------------------------------------
# Network, autoencoder and the volume shape it takes.

def load_model(network_pkl: str, trust_edm_pickle: bool, device: torch.device):
    net, snapshot = evaluation.load_network(network_pkl, trust_edm_pickle, device)
    loss_fn = snapshot.get('loss_fn')
    name = getattr(loss_fn, 'encoder', None)
    frozen = snapshot.get('frozen') or {}
    if name is None or name not in frozen:
        raise ValueError(f'--network: {network_pkl} is not a stage-2 LDM snapshot (no frozen autoencoder embedded); '
            f'train it with -cn=ldm3d_latent')
    return net, frozen[name].to(device)

def volume_shape(ae, native, pad: bool, path: str) -> list[int]:
    shape = list(ae.img_resolution)
    if not pad:
        ldm_data.check_multiple(native, ae.factor, False, path)
        if list(native) != shape:
            raise ValueError(f'{path}: size {list(native)} differs from the network\'s {shape}; enable --pad')
        return shape
    if any(n > s for n, s in zip(native, shape)):
        raise ValueError(f'{path}: size {list(native)} exceeds the network\'s volume size {shape} in some axis')
    return shape

#----------------------------------------------------------------------------

@click.command('inpaint')
@evaluation.common_options
@click.option('--data',                  help='Folder of BraTS inpainting cases', metavar='DIR',            type=str, required=True)
@click.option('--growth',                help='Folder of <case>-growth.nii.gz', metavar='DIR',              type=str, required=True)
@click.option('--tissue',                help='Folder of <case>-tissue-XXXX.nii.gz (per mask) or <case>-tissue.nii.gz', metavar='DIR', type=str, required=True)
@click.option('--split',                 help='Cases: test (patient-level split), train or all', type=click.Choice(['test', 'train', 'all']), default='test', show_default=True)
@click.option('--test-fraction',         help='Fraction of cases in the test split', metavar='FLOAT',       type=click.FloatRange(0, 1), default=0.2, show_default=True)
@click.option('--split-seed',            help='Seed of the split', metavar='INT',                           type=int, default=0, show_default=True)
@click.option('--samples',               help='Seeds per (case, mask): mean and spread', metavar='INT',     type=click.IntRange(min=1), default=4, show_default=True)
@click.option('--max-items',             help='At most this many (case, mask) items', metavar='INT',        type=click.IntRange(min=1), default=None)
@click.option('--pad/--no-pad',          help='Pad volumes to the network size (undone on output)',         default=True, show_default=True)
@click.option('--infer-only',            help='No ground truth: write the inpainted volumes, no metrics',   is_flag=True)
@evaluation.sampler_options
def command(network_pkl, trust_edm_pickle, outdir, batch, seed, data, growth, tissue, split, test_fraction, split_seed, samples,
        max_items, pad, infer_only, sampler):
    """Inpaint BraTS-layout cases with a 3-D LDM; official BraTS 2023 metrics vs. two baselines."""
    evaluation.check_outdir(outdir)
    items = ldm_data.split_items(ldm_data.find_items(data, '--data', need_t1n=not infer_only), split, test_fraction, split_seed, '--split')
    if not items:
        raise ValueError(f'--data: no case of {data} is in the {split} split')
    items = items[:max_items]
    device = evaluation.default_device()
    net, ae = load_model(network_pkl, trust_edm_pickle, device)
    shapes = {}
    for case, k in items: # Every input checked before anything is written.
        c = ldm_data.load_case(data, case, k, growth, tissue, need_t1n=not infer_only)
        shapes[(case, k)] = volume_shape(ae, c['voided'].shape, pad, c['voided_path'])
    evaluation.make_outdir(outdir)
    seeds = sampling.posterior_seeds(range(len(items)), samples, seed, key='--seed')
    rows = []
    for i, (case, k) in enumerate(items):
        c = ldm_data.load_case(data, case, k, growth, tissue, need_t1n=not infer_only)
        inputs = ldm_data.network_inputs(c, shapes[(case, k)])
        norm = ldm_latent.inpaint_case(net, ae, inputs, seeds[i].tolist(), sampler, batch=batch)
        pasted = np.stack([ldm_latent.paste(c['voided'], c['mask'], ldm_data.denormalize(ldm_data.unpad(x, inputs['crop']), c['scale'])) for x in norm])
        pred, spread = sampling.posterior_stats(pasted)
        pred = ldm_latent.paste(c['voided'], c['mask'], pred) # Bit-exact outside the mask (the mean of equal values may round).
        preds = dict(ldm=pred)
        if not infer_only:
            recon = ldm_data.denormalize(ldm_data.unpad(ldm_latent.reconstruct_case(ae, inputs), inputs['crop']), c['scale'])
            preds.update(mean_fill=mean_fill(c['voided'], c['mask']), diffusion_fill=diffusion_fill(c['voided'], c['mask']),
                **{AE_BOUND: ldm_latent.paste(c['voided'], c['mask'], recon)})
            if ae.cond_channels:
                alone = ldm_data.denormalize(ldm_data.unpad(ldm_latent.decode_voided_case(ae, inputs), inputs['crop']), c['scale'])
                preds[DECODER_ONLY] = ldm_latent.paste(c['voided'], c['mask'], alone)
        for method, volume in preds.items():
            folder = os.path.join(outdir, method, case)
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, ldm_data.inference_name(case, k))
            nifti.write_like(path, volume, c['img'])
            if method == 'ldm':
                nifti.write_like(path.replace('-t1n-inference-', '-t1n-inference-std-'), spread, c['img'])
            if not infer_only:
                scores = official_metrics(path, c['mask_path'], c['t1n_path'], c['voided_path'])
                rows.append(dict(case=case, mask=k, method=method, **{m: float(scores[m]) for m in ALL_METRICS}))
        os.makedirs(os.path.join(outdir, 'panels'), exist_ok=True)
        write_panel(os.path.join(outdir, 'panels', f'{case}-{k:04d}.png'), c, pred, spread)
        print(f'{case} mask {k:04d}: ' + ('  '.join(f'{r["method"]} SSIM {r["ssim"]:.4f} PSNR {r["psnr"]:.2f}' for r in rows[-len(preds):]) if rows else 'written'))
    if infer_only:
        return
    summary = dict(network=network_pkl, data=data, split=split, items=len(items), samples=samples, sampler=sampling.network_levels(sampler, net),
        scale_factor=ae.scale_factor, **summarize(rows))
    json_path, csv_path = metrics.write_metrics(outdir, summary, rows)
    for method in [m for m in METHODS + REFERENCES if m in summary]:
        s = summary[method]
        print(f'{method:15s} ' + '  '.join(f'{m.upper()} {s[m]["mean"]:.4f} +- {s[m]["std"]:.4f}' for m in REPORTED))
    for name, p in summary['paired'].items():
        print(f'{name:26s} ' + '  '.join(f'{m.upper()} {v["mean_diff"]:+.4f} (SE {v["se"]:.4f}, wins {v["wins"]}/{v["n"]})' for m, v in p.items()))
    print(f'Wrote {json_path} and {csv_path}')

#----------------------------------------------------------------------------
