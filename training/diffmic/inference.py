# medEDM: diffusion-model training toolkit for medical imaging.

"""DiffMIC inference: the DCG prior, then S label samples per image with the
engine's solvers (training/sampling.sample), y0_s = y_fusion + r_s.

    estimator 'votes' (default)
    probabilities   the share of the S samples whose own argmax (of y0 = prior +
                    denoised residual) is each class: each sample is one prediction
    prediction      the majority class (ties: the lower class index)
    estimator 'mean'
    probabilities   the mean over samples of y0, clipped at 0, normalised to sum 1
                    (uniform if all <= 0)
    prediction      its argmax (argmax of the mean of prior + denoised residual)
    uncertainty     spread: std over samples of y0 at the predicted class;
                    agreement: share of samples whose own argmax is the prediction

The samples of the ODE solver concentrate at the K points onehot_k - prior;
the vote shares estimate the probabilities the model puts on them directly,
where the clipped mean also counts how far a sample has yet to travel (the
demo's validation NLL: votes 0.85-0.92, mean 0.89-1.44, README).

Sample j of image i uses seed `seed + i * S + j` (sampling.posterior_seeds),
so a result does not depend on the batch it was computed in.

With DiffMIC-v2's guided map (the loss's `guided_map` = np > 0, training/
diffmic/loss.py) sample j of an image takes the guide of map position
j mod np^2 as its prior (y0_j = G_j + r_j); S must be a multiple of np^2, so
that every position has S / np^2 samples. `mean` with S = np^2 is v2's mean
over one sampled map; `votes` count the argmax of every position's sample.
`spread` and `agreement` then also include how far the guides of y_global
and y_local disagree. `prior` stays y_fusion, the DCG's own prediction.

The denoiser's image features f(x) depend on the image only, not on the
noisy label or sigma: `cached_encoder` computes them once per image instead
of once per sample and solver step (bench/diffmic.py: the encoder was 83 % of
the time with S = 8 and 11 evaluations; same results to float rounding)."""

import contextlib
import time

import numpy as np
import torch

from training import sampling
from training.diffmic.loss import guided_lambdas, guided_priors, priors, with_prior

#----------------------------------------------------------------------------

def to_probabilities(y0: torch.Tensor) -> torch.Tensor:
    """(..., K) label-space values -> probabilities: clip at 0, normalise (uniform where nothing is > 0)."""
    p = y0.clamp(min=0)
    s = p.sum(dim=-1, keepdim=True)
    return torch.where(s > 0, p / s.clamp(min=1e-12), torch.full_like(p, 1 / p.shape[-1]))

ESTIMATORS = ('votes', 'mean')

def vote_shares(y0: torch.Tensor) -> torch.Tensor:
    """(N, S, K) samples -> (N, K) share of the samples whose argmax is each class."""
    k = y0.shape[-1]
    return torch.nn.functional.one_hot(y0.argmax(dim=-1), k).to(torch.float32).mean(dim=-2)

def class_probabilities(y0: torch.Tensor, estimator: str) -> torch.Tensor:
    """(N, S, K) samples of prior + residual -> (N, K) class probabilities by `estimator`."""
    if estimator == 'votes':
        return vote_shares(y0)
    if estimator == 'mean':
        return to_probabilities(y0.mean(dim=1))
    raise ValueError(f'--estimator: expected one of {", ".join(ESTIMATORS)}, got {estimator!r}')

class _FixedFeatures(torch.nn.Module):
    def __init__(self, features: torch.Tensor):
        super().__init__()
        self.features = features

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        assert cond.shape[0] == self.features.shape[0]
        return self.features.to(cond.dtype)

@contextlib.contextmanager
def cached_encoder(net, images: torch.Tensor, samples: int, enabled: bool = True):
    """While active, the VectorDenoiser's image encoder returns f(images) computed once, repeated S times."""
    model = getattr(net, 'model', None)
    encoder = getattr(model, 'map_cond', None)
    if not enabled or encoder is None or getattr(model, 'cond_type', None) != 'image':
        yield
        return
    model.map_cond = _FixedFeatures(encoder(images.to(torch.float32)).repeat_interleave(samples, dim=0))
    try:
        yield
    finally:
        model.map_cond = encoder

def check_guided_samples(samples: int, guided_map: int) -> None:
    """ValueError naming --samples unless S covers the guided map's np^2 positions evenly."""
    if guided_map and samples % guided_map ** 2:
        raise ValueError(f'--samples {samples}: the snapshot\'s guided map (training.loss.guided_map={guided_map}) has {guided_map ** 2} '
            f'positions; give a multiple of {guided_map ** 2} so that the samples cover the map evenly')

@torch.no_grad()
def predict_batch(net, dcg, images: torch.Tensor, indices, samples: int, seed: int, sampler: dict, timings: dict | None = None,
        cache_features: bool = True, estimator: str = 'votes', guided_map: int = 0) -> dict:
    """Prior and diffusion outputs of a batch of images (N, C, H, W); `indices` (N,) name the images for the seeds;
    `guided_map` the loss's (0: every sample's prior is y_fusion)."""
    device = images.device
    n, k = images.shape[0], dcg.label_dim
    if net is not None:
        check_guided_samples(samples, guided_map)
    t0 = time.perf_counter()
    p = priors(dcg, images)
    t1 = time.perf_counter()
    out = dict(prior=p['prior'].cpu())
    if net is not None:
        seeds = sampling.posterior_seeds(indices, samples, seed, key='--seed').reshape(-1)
        rnd = sampling.StackedRandomGenerator(device, seeds)
        latents = rnd.randn([n * samples, k], device=device)
        cond = images.repeat_interleave(samples, dim=0)
        ps = {key: v.repeat_interleave(samples, dim=0) for key, v in p.items()} # Row i * S + j: sample j of image i.
        if guided_map:
            lam = guided_lambdas(guided_map, device)
            ps = with_prior(ps, guided_priors(ps['embedding'], lam[torch.arange(samples, device=device) % len(lam)].repeat(n)))
        with cached_encoder(net, images, samples, cache_features):
            r = sampling.sample(net, latents, cond=cond, embedding=ps['embedding'], randn_like=rnd.randn_like, **sampler).float()
        y0 = (ps['prior'] + r).reshape(n, samples, k).cpu()
        probs = class_probabilities(y0, estimator)
        pred = probs.argmax(dim=1)
        out.update(y0=y0, probs=probs, pred=pred,
            spread=y0.gather(2, pred[:, None, None].expand(n, samples, 1))[:, :, 0].std(dim=1, unbiased=samples > 1) if samples > 1 else torch.zeros(n),
            agreement=(y0.argmax(dim=2) == pred[:, None]).float().mean(dim=1))
    t2 = time.perf_counter()
    if timings is not None:
        timings['prior'] = timings.get('prior', 0) + t1 - t0
        timings['sampling'] = timings.get('sampling', 0) + t2 - t1
    return out

def predict(net, dcg, dataset, samples: int, seed: int, sampler: dict, batch: int, device: torch.device, timings: dict | None = None,
        estimator: str = 'votes', guided_map: int = 0) -> dict:
    """predict_batch over a whole dataset (images in dataset order) -> numpy arrays."""
    parts = []
    for start in range(0, len(dataset), batch):
        idx = list(range(start, min(start + batch, len(dataset))))
        images = torch.from_numpy(np.stack([dataset[i]['image'] for i in idx])).to(device)
        parts.append(predict_batch(net, dcg, images, idx, samples, seed, sampler, timings, estimator=estimator, guided_map=guided_map))
    return {key: torch.cat([p[key] for p in parts]).numpy() for key in parts[0]}

#----------------------------------------------------------------------------
