# medEDM: diffusion-model training toolkit for medical imaging.

"""Image-quality metrics for reconstruction-type tasks (PET dose enhancement,
inpainting): PSNR, SSIM and NRMSE on batches of 2-D images, in float64.

SSIM follows Wang et al. 2004 ("Image quality assessment: from error
visibility to structural similarity", Eq. 13): Gaussian window 11x11 with
sigma 1.5, K1 = 0.01, K2 = 0.03, C1 = (K1 L)^2, C2 = (K2 L)^2, averaged over
the valid (unpadded) window positions. L is the data range, which changes both
PSNR and SSIM, so every function takes it explicitly (no default).

`write_metrics` writes an evaluation's results (metrics.json + metrics.csv)
atomically, for every evaluate.py subcommand."""

import csv
import io
import json
import math
import numbers
import os

import numpy as np
import torch

from torch_utils import persistence

#----------------------------------------------------------------------------

def _as_batch(x) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).to(torch.float64)
    if x.ndim == 2:
        x = x[None, None]
    elif x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise ValueError(f'metrics: expected images [H, W], [N, H, W] or [N, C, H, W], got shape {tuple(x.shape)}')
    return x

def _check_pair(x, ref) -> tuple[torch.Tensor, torch.Tensor]:
    x, ref = _as_batch(x), _as_batch(ref)
    if x.shape != ref.shape:
        raise ValueError(f'metrics: image shape {tuple(x.shape)} does not match reference shape {tuple(ref.shape)}')
    return x, ref

def _check_range(data_range: float) -> float:
    if not (isinstance(data_range, numbers.Real) and not isinstance(data_range, bool) and np.isfinite(data_range) and data_range > 0):
        raise ValueError(f'metrics: data_range must be a positive number, got {data_range!r}')
    return float(data_range)

#----------------------------------------------------------------------------
# PSNR = 10 log10(L^2 / MSE), per image.

def _check_mask(mask, x: torch.Tensor) -> torch.Tensor | None:
    # A region of the images (same shape, or one [H, W] for all); None = the whole image.
    if mask is None:
        return None
    m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask).to(torch.bool)
    m = m.expand_as(x) if m.ndim == 2 else _as_batch(m).to(torch.bool)
    if m.shape != x.shape:
        raise ValueError(f'metrics: mask shape {tuple(m.shape)} does not match image shape {tuple(x.shape)}')
    if not bool(m.flatten(1).any(1).all()):
        raise ValueError('metrics: the mask is empty for at least one image')
    return m

def _region_mean(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return t.flatten(1).mean(1)
    return (t * mask).flatten(1).sum(1) / mask.flatten(1).sum(1)

def psnr(x, ref, data_range: float, mask=None) -> np.ndarray:
    """Peak signal-to-noise ratio in dB of each image of `x` against `ref` (MSE over `mask` if given)."""
    x, ref = _check_pair(x, ref)
    L = _check_range(data_range)
    mse = _region_mean((x - ref).square(), _check_mask(mask, x))
    return (10 * torch.log10(L ** 2 / mse)).numpy()

#----------------------------------------------------------------------------
# NRMSE = ||x - ref||_2 / ||ref||_2, per image.

def nrmse(x, ref, mask=None) -> np.ndarray:
    """Normalised root-mean-square error of each image (relative to the reference's norm; over `mask` if given)."""
    x, ref = _check_pair(x, ref)
    m = _check_mask(mask, x)
    if m is not None:
        x, ref = x * m, ref * m
    return ((x - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)).numpy()

#----------------------------------------------------------------------------
# SSIM (Wang et al. 2004) with a Gaussian window, per image (mean over channels).

def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return torch.outer(g, g)

def ssim(x, ref, data_range: float, win_size: int = 11, sigma: float = 1.5, K1: float = 0.01, K2: float = 0.03, mask=None) -> np.ndarray:
    """Structural similarity of each image of `x` against `ref` (Gaussian window, valid positions;
    with `mask`, the mean over the valid positions whose window centre is in the mask)."""
    x, ref = _check_pair(x, ref)
    m = _check_mask(mask, x)
    L = _check_range(data_range)
    if min(x.shape[-2:]) < win_size:
        raise ValueError(f'metrics: images of size {tuple(x.shape[-2:])} are smaller than the SSIM window ({win_size})')
    n, c = x.shape[:2]
    w = gaussian_window(win_size, sigma)[None, None]
    def filt(t):
        return torch.nn.functional.conv2d(t.reshape(n * c, 1, *t.shape[-2:]), w)
    mu_x, mu_y = filt(x), filt(ref)
    sxx = filt(x * x) - mu_x ** 2
    syy = filt(ref * ref) - mu_y ** 2
    sxy = filt(x * ref) - mu_x * mu_y
    C1, C2 = (K1 * L) ** 2, (K2 * L) ** 2
    s = ((2 * mu_x * mu_y + C1) * (2 * sxy + C2)) / ((mu_x ** 2 + mu_y ** 2 + C1) * (sxx + syy + C2))
    if m is not None:
        r = win_size // 2
        centre = m[..., r:m.shape[-2] - r, r:m.shape[-1] - r].reshape(n * c, 1, *s.shape[-2:])
        if not bool(centre.reshape(n, -1).any(1).all()):
            raise ValueError(f'metrics: the mask has no pixel at least {r} pixels inside the image border (SSIM window {win_size})')
        return (_region_mean(s.reshape(n, -1), centre.reshape(n, -1))).numpy()
    return s.reshape(n, c, -1).mean(dim=(1, 2)).numpy()

#----------------------------------------------------------------------------
# Calibration of a posterior: does its standard deviation predict the error of
# its mean? Pixels pooled over the batch (inside `mask` if given).

def expected_coverage(k: float, samples: int | None = None) -> float:
    """Coverage of mean +- k std that a calibrated Gaussian posterior gives when mean and std
    (population std, ddof = 0) come from `samples` draws and ref is one more independent draw:
    (ref - mean) / std = t_{S-1} sqrt((S+1)/(S-1)), so 2 F_t(k sqrt((S-1)/(S+1))) - 1
    (S = 8: 0.593 and 0.879 for k = 1, 2); None = infinitely many (0.683, 0.954)."""
    from scipy import stats
    if samples is None:
        return float(2 * stats.norm.cdf(k) - 1)
    if samples < 2:
        raise ValueError(f'metrics: expected_coverage needs at least 2 samples, got {samples}')
    return float(2 * stats.t.cdf(k * math.sqrt((samples - 1) / (samples + 1)), df=samples - 1) - 1)

def calibration(mean, std, ref, mask=None, samples: int | None = None) -> dict:
    """Pearson correlation of std and |mean - ref| over the pixels, and the coverage of the
    intervals mean +- std and mean +- 2 std (fractions of pixels whose ref lies inside),
    beside what a calibrated Gaussian posterior gives with `samples` draws (expected_coverage)."""
    mean, ref = _check_pair(mean, ref)
    std, _ = _check_pair(std, ref)
    if bool((std < 0).any()) or not bool(torch.isfinite(std).all()):
        raise ValueError('metrics: std must be finite and non-negative')
    m = _check_mask(mask, ref)
    err, sd = (mean - ref).abs(), std
    if m is not None:
        err, sd = err[m], sd[m]
    err, sd = err.flatten(), sd.flatten()
    e, d = err - err.mean(), sd - sd.mean()
    denom = float(e.norm() * d.norm())
    return dict(std_error_correlation=float((e * d).sum()) / denom if denom > 0 else float('nan'),
        coverage_1sigma=float((err <= sd).double().mean()), coverage_2sigma=float((err <= 2 * sd).double().mean()),
        calibrated_coverage_1sigma=expected_coverage(1, samples), calibrated_coverage_2sigma=expected_coverage(2, samples),
        mean_std=float(sd.mean()), rmse=float(err.square().mean().sqrt()))

#----------------------------------------------------------------------------
# Results of an evaluation: `summary` (settings and aggregate metrics, any
# nesting of dicts and lists) as metrics.json, `rows` (one dict per image and
# method, the same keys in every row) as metrics.csv, each written atomically.
# Numpy scalars and arrays become plain numbers and lists; non-finite floats
# are written as the strings 'nan', 'inf', '-inf' (as in stats.jsonl), so the
# JSON stays valid for strict readers.

def finite_json(obj):
    """`obj` with numpy values made plain and non-finite floats made strings."""
    if isinstance(obj, dict):
        return {str(k): finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [finite_json(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj

def write_metrics(outdir: str, summary: dict, rows: list[dict], name: str = 'metrics') -> tuple[str, str]:
    """Write <outdir>/<name>.json and <name>.csv atomically; return their paths."""
    fieldnames = list(rows[0]) if rows else []
    for i, row in enumerate(rows):
        if list(row) != fieldnames:
            raise ValueError(f'write_metrics: row {i} has columns {list(row)}, the first row {fieldnames}')
    json_path, csv_path = os.path.join(outdir, f'{name}.json'), os.path.join(outdir, f'{name}.csv')
    text = json.dumps(finite_json(summary), indent=2, allow_nan=False)
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=fieldnames, lineterminator='\n')
    writer.writeheader()
    writer.writerows([finite_json(row) for row in rows])
    persistence.atomic_write_bytes(json_path, text.encode('utf-8'))
    persistence.atomic_write_bytes(csv_path, table.getvalue().encode('utf-8'))
    return json_path, csv_path

#----------------------------------------------------------------------------
