# medEDM: diffusion-model training toolkit for medical imaging.

"""Sampling with any network of the project: noise-level schedules, the
denoiser with classifier-free guidance, full generation, inpainting (masked
sampling) and partial-noise reconstruction, plus the per-seed random
generator and seed splitting that make a sample depend only on its seed.
The ODE/SDE solvers themselves live in training/solvers.py.

Families call:
    sample(net, latents, ...)                       generation from pure noise
    inpaint(net, latents, known, mask, ...)         the known region (mask == 0) is replaced at
                                                    every step by the known values noised to the
                                                    current level; exactly the known values at the end
    reconstruct(net, images, latents, sigma_start)  partial-noise reconstruction: start at
                                                    images + sigma_start * latents, not at pure noise
    edm_sampler(net, latents, ...)                  EDM Algorithm 2 (Heun, EDM time steps), unchanged

References: Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models" (Eq. 5 and Table 1 time steps, Algorithm 2); Lu et al. 2022,
"DPM-Solver++" (uniform log-SNR steps, also warped around sigma_data here); Ho & Salimans 2022, "Classifier-Free
Diffusion Guidance" (Eq. 6, written for denoisers); Lugmayr et al. 2022,
"RePaint" (replacing the known region at every step)."""

from typing import Any, Callable

import numpy as np
import torch

from training import solvers

DISCRETIZATIONS = ('edm', 'vp', 've', 'logsnr', 'logsnr_warped')

#----------------------------------------------------------------------------
# Time steps (Eq. 5): sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho)
# - sigma_max^(1/rho)))^rho, i = 0..N-1, followed by sigma_N = 0. float64.

def edm_sigma_steps(num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80, rho: float = 7,
        round_sigma=None, device: torch.device | str = 'cpu') -> torch.Tensor:
    """EDM noise levels for `num_steps` steps, with a trailing 0 (float64)."""
    return sigma_steps(num_steps, sigma_min, sigma_max, 'edm', rho=rho, round_sigma=round_sigma, device=device)

#----------------------------------------------------------------------------
# Noise levels of the discretisations of EDM Table 1 ("time steps" row),
# and two in log-SNR, all running from sigma_max down to sigma_min, then 0:
#   edm     Eq. 5, polynomial in sigma^(1/rho).
#   vp      t_i = 1 + i/(N-1) (eps_s - 1), sigma_i = sigma_vp(t_i) with
#           sigma_vp(t) = sqrt(exp(beta_d t^2/2 + beta_min t) - 1); beta_d and
#           beta_min solved from sigma_vp(1) = sigma_max, sigma_vp(eps_s) = sigma_min.
#   ve      t_i = sigma_max^2 (sigma_min^2 / sigma_max^2)^(i/(N-1)), sigma = sqrt(t):
#           geometric in sigma.
#   logsnr  uniform in lambda = -log sigma (half the log-SNR), DPM-Solver's
#           "logSNR" steps. For sigma(t) = sqrt(t) this is the same sequence as 've'.
#   logsnr_warped
#           log-SNR steps warped by asinh around sigma_c: with
#           g(s) = asinh(k log(s / sigma_c)) / k, u_i runs linearly from g(sigma_max)
#           to g(sigma_min) and sigma_i = sigma_c exp(sinh(k u_i) / k). The steps in
#           log sigma are smallest near sigma_c, where the denoiser changes most
#           (for Gaussian data of std sigma_c, dD/dlambda peaks at sigma = sigma_c
#           for fixed x, and at sigma = sqrt(2) sigma_c along an ODE trajectory),
#           and grow towards both ends; k -> 0 gives 'logsnr'. k = 0.3 was chosen on settings other than
#           those of bench/sampler_accuracy.py.

def sigma_steps(
    num_steps:      int,                # Number of noise levels > 0 (solver steps).
    sigma_min:      float,              # Lowest noise level > 0.
    sigma_max:      float,              # Highest noise level (start).
    discretization: str = 'edm',        # One of DISCRETIZATIONS.
    rho:            float = 7,          # EDM: time-step exponent.
    epsilon_s:      float = 1e-3,       # VP: smallest t.
    round_sigma:    Callable | None = None, # The network's round_sigma.
    device:         torch.device | str = 'cpu',
    sigma_c:        float = 0.5,        # logsnr_warped: centre of the warp (the data's std, EDM's sigma_data).
    warp_k:         float = 0.3,        # logsnr_warped: strength k of the warp, >= 0 (0 = 'logsnr').
) -> torch.Tensor:
    """Decreasing noise levels sigma_0 = sigma_max, ..., sigma_(N-1) = sigma_min, 0 (float64)."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f'num_steps must be >= 1, got {num_steps}')
    if not (0 < sigma_min < sigma_max < float('inf')):
        raise ValueError(f'need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}')
    if discretization not in DISCRETIZATIONS:
        raise ValueError(f'discretization: unknown discretization {discretization!r} (choose from {", ".join(DISCRETIZATIONS)})')
    frac = torch.arange(num_steps, dtype=torch.float64, device=device) / max(num_steps - 1, 1) # i / (N - 1).
    if discretization == 'edm':
        if not rho > 0:
            raise ValueError(f'rho must be > 0, got {rho}')
        t = (sigma_max ** (1 / rho) + frac * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    elif discretization == 'vp':
        if not 0 < epsilon_s < 1:
            raise ValueError(f'epsilon_s must be in (0, 1), got {epsilon_s}')
        l_max, l_min = np.log1p(sigma_max ** 2), np.log1p(sigma_min ** 2)
        beta_d = 2 * (l_min / epsilon_s - l_max) / (epsilon_s - 1)
        beta_min = l_max - 0.5 * beta_d
        tt = 1 + frac * (epsilon_s - 1)
        t = torch.expm1(0.5 * beta_d * tt ** 2 + beta_min * tt).sqrt()
    elif discretization == 'logsnr_warped':
        if not (0 < sigma_c < float('inf')):
            raise ValueError(f'sigma_c must be a noise level > 0 (the centre of the logsnr_warped steps), got {sigma_c}')
        if not (0 <= warp_k < float('inf')):
            raise ValueError(f'warp_k must be >= 0 (0 = uniform log-SNR steps), got {warp_k}')
        g = (lambda v: v) if warp_k == 0 else (lambda v: np.arcsinh(warp_k * v) / warp_k)
        g_inv = (lambda u: u) if warp_k == 0 else (lambda u: torch.sinh(warp_k * u) / warp_k)
        a, b = g(np.log(sigma_max / sigma_c)), g(np.log(sigma_min / sigma_c))
        t = sigma_c * torch.exp(g_inv(a + frac * (b - a)))
    else: # 've', 'logsnr': geometric.
        t = torch.exp(np.log(sigma_max) + frac * (np.log(sigma_min) - np.log(sigma_max)))
    if discretization != 'edm': # Hit the end points exactly (EDM's formula is kept bit for bit).
        t[0], t[-1] = sigma_max, (sigma_min if num_steps > 1 else sigma_max)
    if round_sigma is not None:
        t = torch.as_tensor(round_sigma(t), dtype=torch.float64, device=device)
    return torch.cat([t, torch.zeros_like(t[:1])])

#----------------------------------------------------------------------------
# Classifier-free guidance (guidance != 1) needs a network that learned the
# unconditional case: class-conditional and trained with label dropout (the
# dropped labels are all-zero vectors, the "unconditional" input). Networks
# that do not record label_dropout (e.g. duck-typed test networks) pass.

def check_guidance(net: torch.nn.Module, guidance: float, key: str = 'guidance') -> None:
    """Raise ValueError (naming `key`) if `net` cannot be sampled with classifier-free guidance `guidance`."""
    if guidance == 1:
        return
    if not getattr(net, 'label_dim', 0):
        raise ValueError(f'{key}={guidance:g}: classifier-free guidance needs a class-conditional network '
            f'(label_dim > 0, trained with label_dropout > 0); this network has label_dim=0 (use {key}=1)')
    dropout = getattr(getattr(net, 'model', None), 'label_dropout', None)
    if dropout is not None and not dropout > 0:
        raise ValueError(f'{key}={guidance:g}: the network was trained without label dropout (label_dropout=0), so it never '
            f'learned the unconditional case that guidance extrapolates from; train with label_dropout > 0 or use {key}=1')

#----------------------------------------------------------------------------
# The denoiser seen by the solvers: float64 in and out, the network in
# float32, with classifier-free guidance (Ho & Salimans 2022, Eq. 6 written
# for denoisers): D = D_uncond + w (D_cond - D_uncond), where the
# unconditional case is the zero label vector (what `label_dropout` trains).
# w = 1 is the plain conditional network and w = 0 the unconditional one,
# both exactly (one network call); other w cost two calls per evaluation.

def make_denoiser(
    net,                                # Preconditioned network D(x; sigma, ...).
    class_labels:   torch.Tensor | None = None, # [N, label_dim] or None.
    cond:           torch.Tensor | None = None, # Condition images [N, Cc, ...] or None.
    embedding:      torch.Tensor | None = None, # Embedding vectors [N, E] or None.
    guidance:       float = 1,          # Guidance weight w.
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Return denoise(x float64, sigma 0-d float64) -> float64 for the solvers."""
    extra = {} if embedding is None else dict(embedding=embedding)
    def call(x, sigma, labels):
        return net(x.to(torch.float32), sigma.to(torch.float32), class_labels=labels, cond=cond, **extra).to(torch.float64)

    guidance = float(guidance)
    if not np.isfinite(guidance):
        raise ValueError(f'guidance must be a finite number, got {guidance}')
    if guidance == 1:
        return lambda x, sigma: call(x, sigma, class_labels)
    check_guidance(net, guidance)
    if class_labels is None:
        raise ValueError(f'guidance={guidance:g}: classifier-free guidance needs class labels (got none)')
    uncond = torch.zeros_like(class_labels)
    if guidance == 0:
        return lambda x, sigma: call(x, sigma, uncond)
    def guided(x, sigma):
        d_uncond = call(x, sigma, uncond)
        return d_uncond + guidance * (call(x, sigma, class_labels) - d_uncond)
    return guided

#----------------------------------------------------------------------------
# Masked sampling (inpainting, RePaint-style replacement): `mask` is 1 where
# the sample is generated and 0 where it is known (the DESIGN's batch
# convention: 1 where the inpainting applies). At noise level sigma the
# known region is set to known + sigma * n with fresh per-seed noise n; at
# sigma = 0 it is set to the known values themselves, bit for bit.
# Repeated calls at the same sigma reuse n (the last (sigma, n) is kept):
# with UniC / AFS the solver projects the predicted point, where the next
# D is evaluated, and then the corrected state at the same sigma, and both
# must carry the same noise. The other solvers project once per noise level,
# so their random stream is the same as with fresh noise on every call.

def known_region_projector(known: torch.Tensor, mask: torch.Tensor, randn_like: Callable,
        shape: torch.Size) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    known = torch.as_tensor(known)
    mask = torch.as_tensor(mask)
    for name, t in (('known', known), ('mask', mask)):
        if t.ndim != len(shape) or any(s not in (1, n) for s, n in zip(t.shape, shape)):
            raise ValueError(f'{name}: expected a tensor broadcastable to the samples {tuple(shape)}, got shape {tuple(t.shape)}')
    if not torch.isfinite(known).all():
        raise ValueError('known: values contain NaN or Inf')
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError('mask: expected 0 (known) and 1 (generate) values only')
    keep = (mask == 0).expand(shape)
    known = known.to(torch.float64).expand(shape)

    last = {} # sigma -> noise n of the last call at sigma > 0.

    def project(x, sigma):
        if sigma == 0:
            value = known
        else:
            if float(sigma) not in last:
                last.clear()
                last[float(sigma)] = randn_like(x)
            value = known + sigma * last[float(sigma)]
        return torch.where(keep.to(x.device), value.to(x.device), x)
    return project

#----------------------------------------------------------------------------
# Generation, inpainting and partial-noise reconstruction share one driver.

def sample(
    net,                                # Preconditioned network (sigma_min, sigma_max, round_sigma).
    latents:        torch.Tensor,       # Standard normal latents [N, C, ...] (images, volumes or vectors).
    class_labels:   torch.Tensor | None = None, # Class labels / vectors [N, label_dim] or None.
    cond:           torch.Tensor | None = None, # Condition images [N, Cc, ...] or None.
    embedding:      torch.Tensor | None = None, # Embedding vectors [N, E] or None.
    randn_like:     Callable = torch.randn_like, # Noise source (StackedRandomGenerator.randn_like for per-seed results).
    preset:         str | None = None,  # Named setting (SAMPLER_PRESETS, e.g. 'fast'): sets the options it names.
    solver:         str = 'heun',       # One of solvers.SOLVERS: 'heun', 'euler', 'dpmpp_2m', 'dpmpp_3m', 'dpmpp_2m_sde', 'gauss_*'.
    discretization: str = 'edm',        # 'edm', 'vp', 've', 'logsnr', 'logsnr_warped'.
    corrector:      str = 'none',       # 'none' or 'unic' (UniC corrector of dpmpp_2m / dpmpp_3m, no extra evaluations).
    afs:            bool = False,       # Analytic first step (dpmpp_2m / dpmpp_3m): one evaluation fewer; not with `images`.
    sigma_c:        float | None = None, # logsnr_warped: centre of the warp, None = net.sigma_data (0.5 without one; a preset's multiple).
    warp_k:         float = 0.3,        # logsnr_warped: strength of the warp (0 = logsnr).
    num_steps:      int = 18,           # Number of noise levels > 0.
    sigma_min:      float | None = 0.002, # Lowest noise level (raised to net.sigma_min); None = a preset's (multiple of sigma_data, floored).
    sigma_max:      float = 80,         # Highest noise level (lowered to net.sigma_max).
    rho:            float = 7,          # EDM time-step exponent.
    S_churn:        float = 0,          # Churn of heun / euler; 0 = deterministic.
    S_min:          float = 0,          # Lowest sigma where churn is applied.
    S_max:          float = float('inf'), # Highest sigma where churn is applied.
    S_noise:        float = 1,          # Noise inflation of the churn.
    guidance:       float = 1,          # Classifier-free guidance weight; 1 = off.
    known:          torch.Tensor | None = None, # Inpainting: known values (data space).
    mask:           torch.Tensor | None = None, # Inpainting: 1 = generate, 0 = known.
    images:         torch.Tensor | None = None, # Partial noise: images to start from ...
    sigma_start:    float | None = None, # ... noised to this level (replaces sigma_max).
) -> torch.Tensor:
    """Run a solver from noise (or from noised `images`) to sigma = 0; float64 [N, C, ...]."""
    if preset is not None:
        o = resolve_preset(dict(preset=preset, solver=solver, discretization=discretization, corrector=corrector, afs=afs, warp_k=warp_k,
            sigma_c=sigma_c, sigma_min=sigma_min), lambda k: k)
        solver, discretization, corrector, afs, warp_k, sigma_c, sigma_min = (o[k] for k in PRESET_KEYS)
    sigma_data = float(getattr(net, 'sigma_data', 0.5))
    levels = network_levels(dict(preset=preset, solver=solver, num_steps=num_steps, afs=afs, sigma_c=sigma_c, sigma_min=sigma_min), net)
    sigma_c = preset_level('sigma_c', levels['sigma_c'], None, sigma_data) # None without a preset: sigma_data.
    sigma_min = levels['sigma_min']
    if images is not None:
        if sigma_start is None or not 0 < sigma_start <= net.sigma_max:
            raise ValueError(f'sigma_start: expected a noise level in (0, {net.sigma_max}] for partial-noise reconstruction, got {sigma_start}')
        if not sigma_start > sigma_min:
            raise ValueError(f'sigma_start={sigma_start} must exceed sigma_min={sigma_min}')
        if tuple(images.shape) != tuple(latents.shape):
            raise ValueError(f'images: expected shape {tuple(latents.shape)} (the latents), got {tuple(images.shape)}')
        if afs:
            raise ValueError('afs: the analytic first step assumes pure noise at sigma_max; it does not apply to '
                'partial-noise reconstruction (set afs=False)')
        sigma_max = sigma_start
    sigma_max = min(sigma_max, net.sigma_max)
    sigmas = sigma_steps(num_steps, sigma_min, sigma_max, discretization, rho=rho, round_sigma=net.round_sigma, device=latents.device,
        sigma_c=sigma_c, warp_k=warp_k)
    denoise = make_denoiser(net, class_labels=class_labels, cond=cond, embedding=embedding, guidance=guidance)
    x = latents.to(torch.float64) * sigmas[0]
    if images is not None:
        x = images.to(torch.float64) + x
    project = None
    if known is not None or mask is not None:
        if known is None or mask is None:
            raise ValueError('inpainting needs both `known` and `mask`')
        project = known_region_projector(known, mask, randn_like, latents.shape)
    return solvers.solve(denoise, x, sigmas, solver=solver, randn_like=randn_like, S_churn=S_churn, S_min=S_min,
        S_max=S_max, S_noise=S_noise, round_sigma=net.round_sigma, project=project, corrector=corrector, afs=afs, sigma_data=sigma_data)

#----------------------------------------------------------------------------
# Inpainting: generate where mask == 1, keep `known` where mask == 0.

def inpaint(net, latents: torch.Tensor, known: torch.Tensor, mask: torch.Tensor, **kwargs) -> torch.Tensor:
    """Masked sampling; the result equals `known` exactly where mask == 0 (float64)."""
    return sample(net, latents, known=known, mask=mask, **kwargs)

#----------------------------------------------------------------------------
# Partial-noise reconstruction: noise `images` to sigma_start with the
# latents and solve back to 0 (num_steps = 1 with Euler is the one-step
# denoiser D(images + sigma_start n; sigma_start)).

def reconstruct(net, images: torch.Tensor, latents: torch.Tensor, sigma_start: float, **kwargs) -> torch.Tensor:
    """Start at images + sigma_start * latents, not at pure noise (float64)."""
    return sample(net, latents, images=images, sigma_start=sigma_start, **kwargs)

#----------------------------------------------------------------------------
# EDM sampler (Algorithm 2): Heun's 2nd-order method with optional stochastic
# churn (S_churn, S_min, S_max, S_noise). Deterministic when S_churn = 0.
# The state is float64; the network sees float32. NFE = 2 * num_steps - 1.

def edm_sampler(
    net,                        # Preconditioned denoiser D(x; sigma, ...).
    latents,                    # Standard normal latents [N, C, ...].
    class_labels    = None,     # Class labels / vectors [N, label_dim] or None.
    cond            = None,     # Condition images [N, Cc, ...] or None.
    randn_like      = torch.randn_like, # Noise source (per-seed for reproducibility).
    embedding       = None,     # Embedding vectors [N, E] or None.
    num_steps       = 18,       # Number of time steps.
    sigma_min       = 0.002,    # Lowest noise level.
    sigma_max       = 80,       # Highest noise level.
    rho             = 7,        # Time step exponent.
    S_churn         = 0,        # Stochasticity strength; 0 = deterministic.
    S_min           = 0,        # Lowest sigma where churn is applied.
    S_max           = float('inf'), # Highest sigma where churn is applied.
    S_noise         = 1,        # Noise inflation of the churn.
) -> torch.Tensor:
    """Generate images from latents with EDM's Algorithm 2."""
    return sample(net, latents, class_labels=class_labels, cond=cond, embedding=embedding, randn_like=randn_like, solver='heun',
        discretization='edm', num_steps=num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho,
        S_churn=S_churn, S_min=S_min, S_max=S_max, S_noise=S_noise)

#----------------------------------------------------------------------------
# Evaluate a network one sample at a time. Convolution and matrix kernels
# (oneDNN, BLAS, cuDNN) pick different algorithms for different batch sizes,
# which changes results in the last bits; with this wrapper the sample of a
# seed is bit-identical whatever the batch size and the number of processes.

class PerSampleNet(torch.nn.Module):
    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__('net'), name)

    def forward(self, x, sigma, **kwargs):
        def pick(v, i):
            if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == x.shape[0]:
                return v[i:i + 1]
            return v
        return torch.cat([self.net(x[i:i + 1], pick(sigma, i), **{k: pick(v, i) for k, v in kwargs.items()}) for i in range(x.shape[0])])

#----------------------------------------------------------------------------
# One torch.Generator per sample: what sample i receives depends only on its
# seed, never on the batch it lands in or the number of processes.

SEED_LIMIT = 1 << 32                    # Seeds are taken modulo this: callers keep them in [0, SEED_LIMIT).

class StackedRandomGenerator:
    def __init__(self, device: torch.device | str, seeds):
        self.generators = [torch.Generator(device).manual_seed(int(seed) % SEED_LIMIT) for seed in seeds]

    def randn(self, size, **kwargs) -> torch.Tensor:
        if size[0] != len(self.generators):
            raise ValueError(f'StackedRandomGenerator: batch size {size[0]} != number of seeds {len(self.generators)}')
        return torch.stack([torch.randn(size[1:], generator=gen, **kwargs) for gen in self.generators])

    def randn_like(self, input: torch.Tensor) -> torch.Tensor:
        return self.randn(input.shape, dtype=input.dtype, layout=input.layout, device=input.device)

    def randint(self, *args, size, **kwargs) -> torch.Tensor:
        if size[0] != len(self.generators):
            raise ValueError(f'StackedRandomGenerator: batch size {size[0]} != number of seeds {len(self.generators)}')
        return torch.stack([torch.randint(*args, size=size[1:], generator=gen, **kwargs) for gen in self.generators])

#----------------------------------------------------------------------------
# Split seeds into batches across ranks (EDM's generate.py): the number of
# batches is a multiple of the world size and rank r takes batches r::world.

def split_seeds(seeds: list[int], max_batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    if max_batch_size < 1:
        raise ValueError(f'batch size must be >= 1, got {max_batch_size}')
    num_batches = ((len(seeds) - 1) // (max_batch_size * world_size) + 1) * world_size
    all_batches = torch.as_tensor(seeds, dtype=torch.int64).tensor_split(num_batches)
    return [b.tolist() for b in all_batches[rank::world_size]]

#----------------------------------------------------------------------------
# Shape of one sample [C, *spatial] of a network: `img_shape` where a network
# declares it (volumes, non-square images), else EDM's square images.

def sample_shape(net) -> list[int]:
    shape = getattr(net, 'img_shape', None)
    if shape is not None:
        return [int(s) for s in shape]
    return [int(net.img_channels), int(net.img_resolution), int(net.img_resolution)]

#----------------------------------------------------------------------------
# Posterior statistics over the S samples of one condition: per-pixel mean
# and standard deviation (population std, ddof = 0, numpy's default),
# accumulated in float64 and returned as float32.

def posterior_stats(samples: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    samples = np.asarray(samples, dtype=np.float64)
    return samples.mean(axis=axis).astype(np.float32), samples.std(axis=axis).astype(np.float32)

#----------------------------------------------------------------------------
# Seeds of conditional sampling (generate.py's conditional mode, evaluate.py):
# sample j of condition (dataset item) i uses cond_seed + i * S + j, so it
# depends only on the item, j, S and cond_seed.

def posterior_seeds(indices, samples_per_cond: int, cond_seed: int = 0, key: str = 'sampling.cond_seed') -> np.ndarray:
    """Seeds [K, S] (int64) of the S samples of each of the K conditions `indices`."""
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    seeds = cond_seed + indices[:, None] * samples_per_cond + np.arange(samples_per_cond, dtype=np.int64)[None]
    if seeds.size and not (seeds.min() >= 0 and seeds.max() < SEED_LIMIT): # Seeds are taken mod 2^32: two would give one sample.
        raise ValueError(f'{key}={cond_seed}: the seeds cond_seed + item * samples_per_cond + j must stay in [0, 2**32)')
    return seeds

#----------------------------------------------------------------------------
# The one validation of sampler options, for every entry point (train.py's
# `sampling` section, generate.py, evaluate.py): the options of sample() as a
# dict; missing keys take SAMPLER_DEFAULTS (= sample()'s defaults and
# config.SamplingConfig's). Messages name each key as prefix + key, or as
# names[key] (a command-line option such as --steps) where `names` is given.
# What needs the network (guidance: check_guidance) is checked after loading.

SAMPLER_DEFAULTS = dict(preset=None, solver='heun', discretization='edm', corrector='none', afs=False, sigma_c=None, warp_k=0.3,
    num_steps=18, sigma_min=0.002, sigma_max=80, rho=7, S_churn=0, S_min=0, S_max=float('inf'), S_noise=1, guidance=1)
SAMPLER_KEYS = tuple(SAMPLER_DEFAULTS)

#----------------------------------------------------------------------------
# Named sampling settings (`sampling.preset`): each sets the options it names;
# an option the user also set to another value than its default is a conflict.
#   fast    few-step generation from noise (NFE = num_steps - 1): gauss_3m_sqrt
#           (exponential integrator about a Gaussian denoiser, residual
#           interpolated as R / sqrt(sigma)) + UniC + AFS on log-SNR steps
#           warped with k = 0.5 around sigma_c = sigma_data at <= 6 NFE, rising
#           linearly to 1.4 sigma_data at >= 10 NFE (dD/dlambda peaks at ~ sqrt(2)
#           sigma_data along an ODE trajectory of Gaussian data; the small net
#           wants 1.4 at 20 NFE, the PET residual net 1.0 at 6 NFE), last noise
#           level sigma_min = max(0.014 sigma_data, 0.002) (0.007 at sigma_data
#           0.5; then x = D). Chosen on bench/sampler_peers.py's settings
#           (Gaussian, mixture, small trained net) and the PET network; README
#           "Few-step sampling against the peers" for where it wins.
# A preset value None of sigma_c / sigma_min is PRESET_PER_SIGMA_DATA's multiple of
# the network's sigma_data (at least PRESET_FLOOR), filled in by sample() where the
# network is known (resolve_levels: also what a record of the run says; such a
# record keeps `preset`, so it is not options to pass again).

SAMPLER_PRESETS = {
    'fast': dict(solver='gauss_3m_sqrt', discretization='logsnr_warped', corrector='unic', afs=True, warp_k=0.5, sigma_c=None, sigma_min=None),
}
PRESET_PER_SIGMA_DATA = { # Units of sigma_data; (a, b, n_a, n_b): a at NFE <= n_a, b at NFE >= n_b, linear between.
    'fast': dict(sigma_c=(1.0, 1.4, 6, 10), sigma_min=0.014),
}
PRESET_FLOOR = {'fast': dict(sigma_min=0.002)} # Absolute lower bounds of those levels (EDM's last level: below it a step buys nothing).

def _describe(per, floor=None) -> str:
    out = f'{per:g}*sigma_data' if not isinstance(per, tuple) else f'({per[0]:g} to {per[1]:g})*sigma_data over NFE {per[2]} to {per[3]}'
    return out if floor is None else f'max({out}, {floor:g})'

def preset_level(key: str, value: float | None, preset: str | None, sigma_data: float, nfe: int | None = None) -> float:
    """sigma_c / sigma_min as sample() uses it: value if set, else the preset's multiple of sigma_data at `nfe`
    evaluations, at least its PRESET_FLOOR (sigma_c: sigma_data without a preset)."""
    if value is not None:
        return float(value)
    per = PRESET_PER_SIGMA_DATA.get(preset, {}).get(key)
    if per is None and key != 'sigma_c':
        raise ValueError(f'{key}: None needs a preset that sets it (got preset={preset!r})')
    if isinstance(per, tuple):
        if nfe is None:
            raise ValueError(f'{key}: the preset {preset!r} sets it per number of evaluations; nfe is needed')
        a, b, n_a, n_b = per
        per = a + (b - a) * min(max((nfe - n_a) / (n_b - n_a), 0.0), 1.0)
    return max((1.0 if per is None else per) * sigma_data, PRESET_FLOOR.get(preset, {}).get(key, 0.0))

def resolve_levels(options: dict, sigma_data: float, net_sigma_min: float = 0.0) -> dict:
    """Resolved sampler options with a preset's sigma_c / sigma_min (None there) filled in for a network's
    sigma_data at the options' NFE, sigma_min raised to the network's own (net_sigma_min), as sample() runs them:
    what a record of the run should say (it keeps `preset`: a record, not options to pass again)."""
    o = dict(options)
    if o.get('preset') is not None:
        nfe = solvers.evaluations(o['solver'], o['num_steps'], o['afs'])
        for key in ('sigma_c', 'sigma_min'):
            o[key] = preset_level(key, o[key], o['preset'], sigma_data, nfe)
    elif 'sigma_min' in o:
        o['sigma_min'] = preset_level('sigma_min', o['sigma_min'], None, sigma_data) # None: ValueError.
    if 'sigma_min' in o:
        o['sigma_min'] = max(o['sigma_min'], float(net_sigma_min))
    return o

def network_levels(options: dict, net) -> dict:
    """resolve_levels for a network (its sigma_data and sigma_min; None, e.g. DiffMIC's DCG alone: EDM's 0.5, 0)."""
    return resolve_levels(options, float(getattr(net, 'sigma_data', 0.5)), float(getattr(net, 'sigma_min', 0)))

PRESET_KEYS = ('solver', 'discretization', 'corrector', 'afs', 'warp_k', 'sigma_c', 'sigma_min') # What sample() resolves.
assert all(set(p) <= set(PRESET_KEYS) for p in SAMPLER_PRESETS.values())
assert all(PRESET_FLOOR.get(n, {}).get('sigma_min') for n, p in SAMPLER_PRESETS.items() if 'sigma_min' in p and p['sigma_min'] is None)

def resolve_preset(options: dict, name: Callable[[str], str] = lambda k: 'sampling.' + k) -> dict:
    """The options with the preset's values filled in (idempotent); ValueError on an unknown preset or a conflict."""
    preset = options.get('preset')
    if preset is None:
        return dict(options)
    if not isinstance(preset, str) or preset not in SAMPLER_PRESETS:
        raise ValueError(f'{name("preset")}: unknown preset {preset!r} (choose from {", ".join(SAMPLER_PRESETS)}, or null)')
    o = dict(options)
    for k, v in SAMPLER_PRESETS[preset].items():
        if k in o and o[k] != v and o[k] != SAMPLER_DEFAULTS[k]:
            per = PRESET_PER_SIGMA_DATA.get(preset, {}).get(k) if v is None else None
            sets = f'{k}={v}' if per is None else f'{k}={_describe(per, PRESET_FLOOR.get(preset, {}).get(k))}'
            raise ValueError(f'{name(k)}={o[k]} conflicts with {name("preset")}={preset}, which sets {sets} (leave out one of them)')
        o[k] = v
    return o

def check_sampler_options(options: dict, prefix: str = 'sampling.', names: dict | None = None) -> dict:
    """Raise ValueError naming the key if the sampler options are unusable; return the keyword arguments of sample()."""
    name = (lambda k: prefix + k) if names is None else (lambda k: names.get(k, k))
    unset = (lambda k: f'set {name(k)}=null') if names is None else (lambda k: f'leave out {name(k)}')
    o = resolve_preset(dict(SAMPLER_DEFAULTS, **{k: options[k] for k in SAMPLER_KEYS if k in options}), name)
    for k, v in o.items(): # Types: what a schema or a command line would give.
        if k == 'preset': # Checked by resolve_preset.
            continue
        if isinstance(SAMPLER_DEFAULTS[k], (str, bool)) or k == 'num_steps':
            kind = {str: 'a name', bool: 'true or false', int: 'an integer'}[type(SAMPLER_DEFAULTS[k])]
            ok = isinstance(v, type(SAMPLER_DEFAULTS[k])) and (k != 'num_steps' or not isinstance(v, bool))
        else:
            kind = 'a number' + (' or null' if k == 'sigma_c' else '')
            ok = (v is None and (k == 'sigma_c' or SAMPLER_PRESETS.get(o['preset'], {}).get(k, 0) is None)) or (isinstance(v, (int, float, np.number)) and not isinstance(v, bool))
        if not ok:
            raise ValueError(f'{name(k)}: expected {kind}, got {v!r}')
    solver, steps = o['solver'], o['discretization']
    if solver not in solvers.SOLVERS:
        raise ValueError(f'{name("solver")}: unknown solver {solver!r} (choose from {", ".join(solvers.SOLVERS)})')
    if steps not in DISCRETIZATIONS:
        raise ValueError(f'{name("discretization")}: unknown discretization {steps!r} (choose from {", ".join(DISCRETIZATIONS)})')
    if o['corrector'] not in solvers.CORRECTORS:
        raise ValueError(f'{name("corrector")}: unknown corrector {o["corrector"]!r} (choose from {", ".join(solvers.CORRECTORS)})')
    if o['corrector'] != 'none' and solver not in solvers.MULTISTEP_SOLVERS:
        raise ValueError(f'{name("corrector")}={o["corrector"]} applies to the {", ".join(solvers.MULTISTEP_SOLVERS)} solvers, not {solver!r}')
    if o['num_steps'] < 1:
        raise ValueError(f'{name("num_steps")} must be >= 1, got {o["num_steps"]}')
    if o['afs'] and solver not in solvers.MULTISTEP_SOLVERS:
        raise ValueError(f'{name("afs")} applies to the {", ".join(solvers.MULTISTEP_SOLVERS)} solvers, not {solver!r}')
    if o['afs'] and o['num_steps'] < 2:
        raise ValueError(f'{name("afs")} needs {name("num_steps")} >= 2, got {o["num_steps"]}')
    sigma_c, warp_k = o['sigma_c'], o['warp_k']
    if sigma_c is not None and not 0 < sigma_c < float('inf'):
        raise ValueError(f'{name("sigma_c")} must be a noise level > 0 or null (the network\'s sigma_data), got {sigma_c}')
    if not 0 <= warp_k < float('inf'):
        raise ValueError(f'{name("warp_k")} must be >= 0 (0 = uniform log-SNR steps), got {warp_k}')
    if steps != 'logsnr_warped': # Both would be ignored silently.
        if sigma_c is not None:
            raise ValueError(f'{name("sigma_c")} applies to {name("discretization")}=logsnr_warped only, not {steps!r} ({unset("sigma_c")})')
        if warp_k != SAMPLER_DEFAULTS['warp_k']:
            raise ValueError(f'{name("warp_k")} applies to {name("discretization")}=logsnr_warped only, not {steps!r} '
                f'(leave {name("warp_k")} at {SAMPLER_DEFAULTS["warp_k"]})')
    if o['sigma_min'] is None and not PRESET_FLOOR[o['preset']]['sigma_min'] < o['sigma_max']: # The preset's least level.
        per = _describe(PRESET_PER_SIGMA_DATA[o['preset']]['sigma_min'], PRESET_FLOOR[o['preset']]['sigma_min'])
        raise ValueError(f'{name("sigma_max")}={o["sigma_max"]} must exceed the last noise level of {name("preset")}={o["preset"]}, {per}')
    if o['sigma_min'] is not None and not (0 < o['sigma_min'] < o['sigma_max']):
        raise ValueError(f'{name("sigma_min")} / {name("sigma_max")}: need 0 < sigma_min < sigma_max, got {o["sigma_min"]}, {o["sigma_max"]}')
    if not np.isfinite(o['guidance']):
        raise ValueError(f'{name("guidance")} must be a finite number, got {o["guidance"]}')
    if not o['rho'] > 0:
        raise ValueError(f'{name("rho")} must be > 0, got {o["rho"]}')
    if not (o['S_noise'] >= 0 and o['S_min'] <= o['S_max']):
        raise ValueError(f'{name("S_noise")} / {name("S_min")} / {name("S_max")}: need S_noise >= 0 and S_min <= S_max, got {o["S_noise"]}, '
            f'{o["S_min"]}, {o["S_max"]}')
    if o['S_churn'] < 0:
        raise ValueError(f'{name("S_churn")} must be >= 0, got {o["S_churn"]}')
    if o['S_churn'] > 0 and solver not in solvers.STOCHASTIC_CHURN_SOLVERS:
        raise ValueError(f'{name("S_churn")} applies to the heun and euler solvers, not {solver!r} '
            f'(use {name("solver")}=dpmpp_2m_sde for a stochastic multistep sampler)')
    return o

#----------------------------------------------------------------------------
