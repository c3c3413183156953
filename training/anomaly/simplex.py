# medEDM: diffusion-model training toolkit for medical imaging.

"""2-D simplex noise (Perlin 2001; Gustavson 2005, "Simplex noise demystified")
with octaves, on the device of the data, as the anomaly-detection DDPMs use it
(AnoDDPM, Wyatt et al. 2022; cDDPM / pDDPM, Behrendt et al.):

    field(p) = sum_k persistence^k * simplex(p / (frequency / 2^k)),  k = 0..octaves-1

p in pixels; the reference's parameters are octaves 6, persistence 0.8,
frequency 64 (feature size of the first octave in pixels, halved per octave).

Convention checked against the reference code (AnoDDPM simplex.py,
Julian-Wyatt/AnoDDPM, `rand_2d_octaves`, which cDDPM/pDDPM's
generate_noise.py calls): the octave sum evaluates noise2(x / frequency,
y / frequency) at the integer pixel coordinates, then halves `frequency`
and multiplies the amplitude by `persistence`; so "frequency" is a length
in pixels (a period of the lattice), not cycles per image, as here (test:
the field of frequency 2f at every second pixel is the field of frequency f).
Two differences we keep and state: the reference uses OpenSimplex (Kurt
Spencer's lattice and gradients, output / 47), we use Gustavson's 2-D
simplex (output x 70), so single values and the exact amplitude differ
(neither is re-normalised); and the reference's randomness is its
permutation table (seeded), ours a permutation plus a random lattice offset. At another
image size the same physical feature size needs frequency scaled with the
size (64 at 96 px = 21.33 at 32 px): `simplex_frequency` of the loss.
ONE field is drawn per call and shared by every sample and channel of the
batch, and it is NOT re-normalised to unit variance (both as the reference):
its standard deviation is about 0.7 at 96 px (see `field_std`), so sigma * field has a
smaller spread than sigma * Gaussian noise."""

import math

import torch

F2 = 0.5 * (math.sqrt(3.0) - 1.0) # Skew factor of the 2-D simplex grid.
G2 = (3.0 - math.sqrt(3.0)) / 6.0 # Unskew factor.
_GRAD = torch.tensor([[1, 1], [-1, 1], [1, -1], [-1, -1], [1, 0], [-1, 0], [1, 0], [-1, 0], [0, 1], [0, -1], [0, 1], [0, -1]], dtype=torch.float32)

#----------------------------------------------------------------------------
# One octave: simplex noise at points (x, y) with a permutation table of 256.

def simplex_2d(x: torch.Tensor, y: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Simplex noise in [-1, 1] at float coordinates x, y (same shape); perm: int64 (512,)."""
    grad = _GRAD.to(x.device)
    s = (x + y) * F2
    i, j = torch.floor(x + s), torch.floor(y + s)
    t = (i + j) * G2
    x0, y0 = x - (i - t), y - (j - t)                   # Offset from the first corner.
    upper = (x0 > y0).to(x.dtype)                        # Lower or upper triangle of the cell.
    corners = [(x0, y0, 0, 0), (x0 - upper + G2, y0 - (1 - upper) + G2, upper, 1 - upper), (x0 - 1 + 2 * G2, y0 - 1 + 2 * G2, 1, 1)]
    ii, jj = i.long() & 255, j.long() & 255
    total = torch.zeros_like(x)
    for cx, cy, di, dj in corners:
        di = di.long() if torch.is_tensor(di) else di
        dj = dj.long() if torch.is_tensor(dj) else dj
        g = grad[perm[(ii + di) + perm[(jj + dj)]] % 12]
        r = (0.5 - cx * cx - cy * cy).clamp(min=0)
        total = total + r ** 4 * (g[..., 0] * cx + g[..., 1] * cy)
    return 70.0 * total

#----------------------------------------------------------------------------
# Octave sum on an H x W pixel grid: a random permutation and offset per call.

def simplex_field(height: int, width: int, octaves: int = 6, persistence: float = 0.8, frequency: float = 64,
        device: torch.device | str = 'cpu', generator: torch.Generator | None = None) -> torch.Tensor:
    """One (H, W) float32 field; drawn from `generator` (default: torch's global one of `device`)."""
    if octaves < 1 or not frequency > 0:
        raise ValueError(f'simplex noise: octaves must be >= 1 and frequency > 0, got {octaves}, {frequency}')
    p = torch.randperm(256, device=device, generator=generator)
    perm = torch.cat([p, p])
    offset = torch.rand(2, device=device, generator=generator, dtype=torch.float32) * 256
    yy, xx = torch.meshgrid(torch.arange(height, device=device, dtype=torch.float32),
        torch.arange(width, device=device, dtype=torch.float32), indexing='ij')
    field = torch.zeros([height, width], device=device)
    amplitude, freq = 1.0, float(frequency)
    for _ in range(octaves):
        field += amplitude * simplex_2d(xx / freq + offset[0], yy / freq + offset[1], perm)
        freq /= 2
        amplitude *= persistence
    return field

def simplex_like(y: torch.Tensor, octaves: int = 6, persistence: float = 0.8, frequency: float = 64) -> torch.Tensor:
    """Noise source 'simplex' of the loss objects: one field of y's H x W, shared over the batch (and channels)."""
    if y.ndim != 4:
        raise ValueError(f"training.loss.noise='simplex' is 2-D noise for (N, C, H, W) images, got a target of shape {tuple(y.shape)}")
    field = simplex_field(y.shape[2], y.shape[3], octaves, persistence, frequency, device=y.device)
    return field.to(y.dtype).expand_as(y)

def field_std(size: int = 96, draws: int = 8, **kwargs) -> float:
    """Empirical standard deviation of the field (documentation and tests)."""
    gen = torch.Generator().manual_seed(0)
    return float(torch.stack([simplex_field(size, size, generator=gen, **kwargs) for _ in range(draws)]).std())

#----------------------------------------------------------------------------
