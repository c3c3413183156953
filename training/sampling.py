# medEDM: diffusion-model training toolkit for medical imaging.

"""Samplers (solvers of the probability-flow ODE / SDE) as pure functions of
(net, latents, schedule, conditioning), reusable by every family, plus the
per-seed random generator that makes a sample depend only on its seed.

Reference: Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models", Algorithm 2 and Eq. 5 (time steps)."""

import numpy as np
import torch

#----------------------------------------------------------------------------
# Time steps (Eq. 5): sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho)
# - sigma_max^(1/rho)))^rho, i = 0..N-1, followed by sigma_N = 0. float64.

def edm_sigma_steps(num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80, rho: float = 7,
        round_sigma=None, device: torch.device | str = 'cpu') -> torch.Tensor:
    """EDM noise levels for `num_steps` steps, with a trailing 0 (float64)."""
    if num_steps < 1:
        raise ValueError(f'num_steps must be >= 1, got {num_steps}')
    if not (0 < sigma_min < sigma_max):
        raise ValueError(f'need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}')
    step_indices = torch.arange(num_steps, dtype=torch.float64, device=device)
    denom = max(num_steps - 1, 1)
    t_steps = (sigma_max ** (1 / rho) + step_indices / denom * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    if round_sigma is not None:
        t_steps = torch.as_tensor(round_sigma(t_steps), dtype=torch.float64, device=device)
    return torch.cat([t_steps, torch.zeros_like(t_steps[:1])])

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
    sigma_min = max(sigma_min, net.sigma_min)
    sigma_max = min(sigma_max, net.sigma_max)
    t_steps = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho, net.round_sigma, latents.device)

    def denoise(x, t):
        return net(x.to(torch.float32), t.to(torch.float32), class_labels=class_labels, cond=cond).to(torch.float64)

    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next

        # Increase noise temporarily (the draw happens every step, as in EDM).
        gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = torch.as_tensor(net.round_sigma(t_cur + gamma * t_cur), dtype=torch.float64, device=latents.device)
        x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)

        # Euler step.
        d_cur = (x_hat - denoise(x_hat, t_hat)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur

        # Apply 2nd order correction.
        if i < num_steps - 1:
            d_prime = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next

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

class StackedRandomGenerator:
    def __init__(self, device: torch.device | str, seeds):
        self.generators = [torch.Generator(device).manual_seed(int(seed) % (1 << 32)) for seed in seeds]

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
