# medEDM: diffusion-model training toolkit for medical imaging.

"""Loss objects of the anomaly-detection DDPMs in EDM form, and the mapping of
the reference's discrete time steps onto EDM noise levels.

The references (cDDPM, pDDPM; Behrendt et al.) are VP DDPMs with the cosine
schedule (Nichol & Dhariwal 2021, T = 1000), x0 prediction and an L1 loss:
x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) n, on images scaled to [-1, 1].
Dividing by sqrt(abar_t) gives EDM's x0 + sigma n with

    sigma_t = sqrt((1 - abar_t) / abar_t)                       (EDM Eq. 4 with s(t) = sqrt(abar_t))

and one network call D(x; sigma) is the x0 prediction. Our data are scaled
exactly as the reference's ([0, 1] after the 1st-99th brain percentile
rescaling, then 2 v - 1), so sigma needs no further factor (data scaled by a
would need a * sigma_t). The reference reconstructs at t = 500 (the call at
index t - 1 = 499): sigma_test = 1.0124; cDDPM averages t = 250, 500, 750:
sigma = 0.4250, 1.0124, 2.4354 (reference_sigma below; tests pin them).

    AnomalyLoss   cDDPM / DDPM objective: sigma from the cosine schedule with
                  t ~ U{0..T-1} (or EDM's log-normal), L1, uniform weight
    PatchedLoss   pDDPM: sigma(p) = sigma * M_box(p), one grid cell (or a
                  random box) per sample; the loss is inside the box
    CondLoss      cDDPM: the clean (augmented) slice goes to the network's
                  encoder as `cond`
    MaskedPretrainLoss  masked-image reconstruction of the encoder (a stage)
"""

import numpy as np
import torch

from torch_utils import persistence
from training import loss as loss_mod

#----------------------------------------------------------------------------
# Cosine schedule (improved DDPM, Eq. 17) in its discrete form with the betas
# clipped at 0.999, as the reference's GaussianDiffusion: abar[t], t = 0..T-1.

def cosine_alpha_bar(T: int = 1000, s: float = 0.008) -> np.ndarray:
    x = np.linspace(0, T, T + 1, dtype=np.float64)
    f = np.cos(((x / T) + s) / (1 + s) * np.pi * 0.5) ** 2
    f = f / f[0]
    betas = np.clip(1 - f[1:] / f[:-1], 0, 0.999)
    return np.cumprod(1 - betas)

def sigma_table(T: int = 1000) -> np.ndarray:
    """EDM sigma of every discrete step index t = 0..T-1 (float64)."""
    abar = cosine_alpha_bar(T)
    return np.sqrt((1 - abar) / abar)

def reference_sigma(t_ref, T: int = 1000) -> float | list[float]:
    """sigma_test of the reference's test time step t (the model call at index t - 1)."""
    table = sigma_table(T)
    if isinstance(t_ref, (list, tuple)):
        return [reference_sigma(t, T) for t in t_ref]
    t_ref = int(t_ref)
    if not 1 <= t_ref <= T:
        raise ValueError(f'reference time step must be in 1..{T}, got {t_ref}')
    return float(table[t_ref - 1])

#----------------------------------------------------------------------------
# cDDPM / DDPM objective in EDM form.

_SIGMA_DISTS = ('cosine', 'edm')
_WEIGHTINGS = ('uniform', 'edm')

@persistence.persistent_class
class AnomalyLoss(loss_mod.EDMLoss):
    def __init__(self,
        sigma_dist  = 'cosine',     # 'cosine': sigma of t ~ U{t_min..t_max} of the cosine VP schedule (reference); 'edm': log-normal.
        T           = 1000,         # Steps of the reference's schedule.
        t_min       = 0,            # Smallest training step (sigma_dist='cosine').
        t_max       = 999,          # Largest training step.
        weighting   = 'uniform',    # 'uniform': lambda = 1 (reference's x0 loss); 'edm': 1/c_out^2 (l2) or 1/c_out (l1).
        test_t      = [500],        # Reference test step(s); their sigmas reconstruct the snapshot grid (and are the evaluation default).
        noise       = 'simplex',    # Noise source (registered by training/anomaly): 'simplex' or 'gaussian'.
        distance    = 'l1',         # 'l1' (reference) or 'l2'.
        simplex_frequency = 64,     # Feature size (pixels) of the first simplex octave; reference 64 at 96 px.
        **kwargs,                   # P_mean, P_std, sigma_data of EDMLoss; mask_key, target_key.
    ):
        super().__init__(noise=noise, distance=distance, **kwargs)
        if not (isinstance(simplex_frequency, (int, float)) and simplex_frequency > 0):
            raise ValueError(f'training.loss.simplex_frequency must be a positive number, got {simplex_frequency!r}')
        self.simplex_frequency = float(simplex_frequency)
        if sigma_dist not in _SIGMA_DISTS:
            raise ValueError(f"training.loss.sigma_dist: expected 'cosine' or 'edm', got {sigma_dist!r}")
        if weighting not in _WEIGHTINGS:
            raise ValueError(f"training.loss.weighting: expected 'uniform' or 'edm', got {weighting!r}")
        if not (isinstance(T, int) and T >= 2 and 0 <= t_min <= t_max < T):
            raise ValueError(f'training.loss: need 0 <= t_min <= t_max < T, got t_min={t_min}, t_max={t_max}, T={T}')
        self.sigma_dist = sigma_dist
        self.T, self.t_min, self.t_max = int(T), int(t_min), int(t_max)
        self.weighting = weighting
        self.test_t = [int(t) for t in (test_t if isinstance(test_t, (list, tuple)) else [test_t])]
        self.test_sigmas = reference_sigma(self.test_t, self.T) # Validates test_t.
        self._table = torch.as_tensor(sigma_table(self.T), dtype=torch.float32)

    def sample_noise(self, y):
        if self.noise != 'simplex':
            return super().sample_noise(y)
        from training.anomaly import simplex
        return simplex.simplex_like(y, frequency=self.frequency)

    @property
    def frequency(self) -> float:
        return getattr(self, 'simplex_frequency', 64.0) # Snapshots from before the option: the reference's 64.

    def sample_sigma(self, shape, device):
        if self.sigma_dist == 'edm':
            return super().sample_sigma(shape, device)
        t = torch.randint(self.t_min, self.t_max + 1, shape, device=device)
        return self._table.to(device)[t]

    def weight(self, sigma):
        if self.weighting == 'uniform':
            return torch.ones_like(sigma)
        w = super().weight(sigma) # 1 / c_out^2.
        return w if self.distance == 'l2' else w.sqrt()

    # The snapshot's picture: inputs (top rows) and one-call reconstructions.
    @torch.no_grad()
    def grid(self, net, batch, frozen=None):
        from training.anomaly import inference # Imported here: inference builds on this module.
        x = batch[self.target_key][:8]
        noise = inference.noise_fields(len(x), x.shape[-2], x.shape[-1], self.noise, x.device, seed=0, frequency=self.frequency)
        reco = self.reconstruct(net, x, noise)
        return torch.cat([x, reco.clamp(-1, 1)])

    def reconstruct(self, net, x, noise):
        from training.anomaly import inference
        return inference.reconstruct_full(net, x, noise, self.test_sigmas)

#----------------------------------------------------------------------------
# Patched DDPM: noise only inside a box (sigma map), one box per sample.

@persistence.persistent_class
class PatchedLoss(AnomalyLoss):
    def __init__(self,
        patch_size  = 48,           # Box side in pixels (reference: 48 on 96 x 96).
        stride      = None,         # Grid stride, None = patch_size (non-overlapping grid, reference).
        box         = 'grid',       # 'grid': one grid cell per sample (reference); 'random': a random box inside the image.
        **kwargs,                   # AnomalyLoss options.
    ):
        super().__init__(**kwargs)
        if box not in ('grid', 'random'):
            raise ValueError(f"training.loss.box: expected 'grid' or 'random', got {box!r}")
        if not (isinstance(patch_size, int) and patch_size >= 1) or not (stride is None or (isinstance(stride, int) and stride >= 1)):
            raise ValueError(f'training.loss.patch_size / stride must be positive integers, got {patch_size!r}, {stride!r}')
        self.patch_size = patch_size
        self.stride = patch_size if stride is None else stride
        self.box = box

    def sigma_map(self, batch, y):
        from training.anomaly import inference
        n, h, w = y.shape[0], y.shape[-2], y.shape[-1]
        if self.box == 'grid':
            boxes = inference.grid_boxes(h, w, self.patch_size, self.stride)
            pick = torch.randint(len(boxes), [n], device=y.device)
            corners = torch.as_tensor([b[:2] for b in boxes], device=y.device)[pick]
        else:
            corners = torch.stack([torch.randint(h - self.patch_size + 1, [n], device=y.device),
                torch.randint(w - self.patch_size + 1, [n], device=y.device)], dim=1)
        return inference.box_masks(corners, self.patch_size, h, w).to(y.dtype)

    def reconstruct(self, net, x, noise):
        from training.anomaly import inference
        boxes = inference.grid_boxes(x.shape[-2], x.shape[-1], self.patch_size, self.stride)
        return inference.reconstruct_patched(net, x, noise, self.test_sigmas[0], boxes)

#----------------------------------------------------------------------------
# cDDPM: the encoder of the network sees the clean input slice (`cond`).

@persistence.persistent_class
class CondLoss(AnomalyLoss):
    def __init__(self, **kwargs): # AnomalyLoss options; test_t default is the reference's ensemble 250, 500, 750.
        kwargs.setdefault('test_t', [250, 500, 750])
        super().__init__(**kwargs)

    def condition(self, net, batch):
        return dict(class_labels=batch.get('label'), cond=batch[self.target_key])

#----------------------------------------------------------------------------
# Encoder pretraining by masked-image reconstruction (a stage of its own; after
# SparK, Tian et al. 2023, but dense: masked patches are set to the background
# value -1 instead of sparse convolutions). Loss: squared error on masked patches.

@persistence.persistent_class
class MaskedPretrainLoss:
    def __init__(self,
        mask_ratio  = 0.65,         # Fraction of patches masked (reference: 0.65).
        patch_size  = 8,            # Patch side in pixels (SparK: the encoder's total stride).
        target_key  = 'image',      # Batch key of the images.
    ):
        if not 0 < mask_ratio < 1:
            raise ValueError(f'training.loss.mask_ratio must be in (0, 1), got {mask_ratio!r}')
        self.mask_ratio = float(mask_ratio)
        self.patch_size = int(patch_size)
        self.target_key = target_key

    def patch_mask(self, y: torch.Tensor) -> torch.Tensor:
        n, h, w = y.shape[0], y.shape[-2], y.shape[-1]
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f'training.loss.patch_size={p} must divide the image size {h} x {w}')
        cells = (h // p) * (w // p)
        keep = max(1, int(round(cells * (1 - self.mask_ratio))))
        order = torch.rand([n, cells], device=y.device).argsort(dim=1)
        masked = torch.ones([n, cells], device=y.device)
        masked.scatter_(1, order[:, :keep], 0)
        masked = masked.reshape(n, 1, h // p, w // p)
        return masked.repeat_interleave(p, dim=2).repeat_interleave(p, dim=3)

    def __call__(self, net, batch, augment_pipe=None):
        if augment_pipe is not None:
            batch, _ = augment_pipe(batch)
        y = batch[self.target_key]
        m = self.patch_mask(y)
        out = net(torch.where(m > 0, -torch.ones_like(y), y))
        return (out - y) ** 2 * m

    @torch.no_grad()
    def grid(self, net, batch, frozen=None):
        y = batch[self.target_key][:8]
        m = self.patch_mask(y)
        x = torch.where(m > 0, -torch.ones_like(y), y)
        return torch.cat([y, x, net(x).clamp(-1, 1)])

#----------------------------------------------------------------------------
