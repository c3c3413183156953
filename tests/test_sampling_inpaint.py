# medEDM: masked sampling (inpainting) and partial-noise reconstruction.

import numpy as np
import pytest
import torch

from training import networks
from training import sampling
from training import solvers

#----------------------------------------------------------------------------
# A closed-form "network" for any tensor shape: the ideal denoiser of N(0, s^2 I).

class GaussianNet:
    sigma_min, sigma_max, sigma_data, label_dim, cond_channels = 0, float('inf'), 0.5, 0, 0

    def __init__(self, s=0.5):
        self.s = s

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def __call__(self, x, sigma, class_labels=None, cond=None):
        return self.s ** 2 / (self.s ** 2 + sigma ** 2) * x

@pytest.fixture(scope='module')
def unet():
    torch.manual_seed(0)
    return networks.EDMPrecond(img_resolution=8, img_channels=2, model_type='SongUNet', model_channels=8, channel_mult=[1],
        num_blocks=1, attn_resolutions=[], dropout=0).eval().requires_grad_(False)

def _mask(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) < 0.5).float()

#----------------------------------------------------------------------------

@torch.no_grad()
@pytest.mark.parametrize('solver', solvers.SOLVERS)
def test_inpainting_keeps_known_region_exactly(unet, solver):
    rnd = sampling.StackedRandomGenerator('cpu', [0, 1, 2])
    latents = rnd.randn([3, 2, 8, 8])
    known = torch.rand([3, 2, 8, 8], generator=torch.Generator().manual_seed(5)) * 2 - 1
    mask = _mask([3, 1, 8, 8]) # 1 = generate, 0 = known; broadcast over channels.
    out = sampling.inpaint(unet, latents, known, mask, solver=solver, num_steps=5, randn_like=rnd.randn_like).float()
    keep = (mask == 0).expand_as(out)
    assert torch.equal(out[keep], known[keep])
    assert not torch.equal(out[~keep], known[~keep])
    assert torch.isfinite(out).all()

@torch.no_grad()
def test_inpainting_volumes_and_known_region_shapes():
    rnd = sampling.StackedRandomGenerator('cpu', [7, 8])
    latents = rnd.randn([2, 1, 4, 6, 6]) # Volumes [N, C, D, H, W].
    known = torch.randn([2, 1, 4, 6, 6])
    mask = _mask([1, 1, 4, 6, 6]) # One mask for the batch.
    out = sampling.inpaint(GaussianNet(), latents, known, mask, solver='dpmpp_3m', num_steps=8, randn_like=rnd.randn_like).float()
    keep = (mask == 0).expand_as(out)
    assert torch.equal(out[keep], known[keep])

@torch.no_grad()
def test_inpainting_full_mask_is_plain_generation(unet):
    rnd = sampling.StackedRandomGenerator('cpu', [0, 1])
    latents = rnd.randn([2, 2, 8, 8])
    out = sampling.inpaint(unet, latents, torch.zeros_like(latents), torch.ones([2, 1, 8, 8]), solver='dpmpp_2m', num_steps=4)
    assert torch.equal(out, sampling.sample(unet, latents, solver='dpmpp_2m', num_steps=4))

@torch.no_grad()
def test_inpainting_is_per_seed_deterministic(unet):
    # A seed's inpainted sample does not depend on the other samples of the batch (per-sample net).
    known = torch.rand([3, 2, 8, 8], generator=torch.Generator().manual_seed(5))
    mask = _mask([3, 1, 8, 8])
    net = sampling.PerSampleNet(unet)
    def run(seeds, rows):
        rnd = sampling.StackedRandomGenerator('cpu', seeds)
        return sampling.inpaint(net, rnd.randn([len(seeds), 2, 8, 8]), known[rows], mask[rows], solver='heun', S_churn=3,
            num_steps=3, randn_like=rnd.randn_like)
    full = run([10, 11, 12], [0, 1, 2])
    assert torch.equal(run([11], [1]), full[1:2])

# With UniC / AFS the solver projects the predicted point (where the next D is
# evaluated) and then the corrected state, both at the same sigma: the known
# region must carry the same noise in both, one draw per noise level > 0.

class _CountingRandn:
    def __init__(self, seeds):
        self.rnd, self.draws = sampling.StackedRandomGenerator('cpu', seeds), 0
    def randn_like(self, x):
        self.draws += 1
        return self.rnd.randn_like(x)

@torch.no_grad()
@pytest.mark.parametrize('solver, kwargs', [('dpmpp_2m', dict(corrector='unic')), ('dpmpp_3m', dict(corrector='unic', afs=True)),
    ('dpmpp_2m', dict(afs=True))])
def test_inpainting_with_unic_and_afs_uses_one_noise_per_level(solver, kwargs):
    num_steps = 6
    latents = sampling.StackedRandomGenerator('cpu', [0, 1]).randn([2, 1, 4, 4])
    known = torch.rand([2, 1, 4, 4], generator=torch.Generator().manual_seed(5)) * 2 - 1
    mask = _mask([2, 1, 4, 4])
    keep = (mask == 0).expand_as(latents)

    # Through sample(): the known region of the result is exact, one draw per noise level > 0.
    rnd = _CountingRandn([0, 1])
    out = sampling.inpaint(GaussianNet(), latents, known, mask, solver=solver, num_steps=num_steps, randn_like=rnd.randn_like, **kwargs)
    assert torch.equal(out.float()[keep], known[keep])
    assert rnd.draws == num_steps # sigma_0 .. sigma_(N-1); none at sigma = 0.

    # Through the solver: every projection at one sigma (predicted point, corrected state) has the same known region.
    rnd = _CountingRandn([0, 1])
    project = sampling.known_region_projector(known, mask, rnd.randn_like, latents.shape)
    seen = {}
    def recording(x, sigma):
        x = project(x, sigma)
        seen.setdefault(float(sigma), []).append(x[keep])
        return x
    sigmas = sampling.sigma_steps(num_steps, 0.002, 80, 'logsnr_warped')
    den = sampling.make_denoiser(GaussianNet())
    solvers.solve(den, latents.double() * 80, sigmas, solver, project=recording, **kwargs)
    assert sum(len(v) for v in seen.values()) > len(seen) # Some levels are projected more than once ...
    assert all(torch.equal(v[0], w) for v in seen.values() for w in v) # ... always with the same noise.
    assert rnd.draws == len([s for s in seen if s > 0]) == num_steps

@torch.no_grad()
@pytest.mark.parametrize('solver, kwargs', [('heun', dict(S_churn=3)), ('euler', {}), ('dpmpp_2m', {}), ('dpmpp_3m', {}),
    ('dpmpp_2m_sde', {})])
def test_inpainting_random_stream_of_the_plain_solvers_is_unchanged(solver, kwargs):
    # These solvers project once per noise level, so reusing the noise at a repeated sigma changes
    # nothing: the result equals that of a projector drawing fresh noise on every call, bit for bit.
    latents = sampling.StackedRandomGenerator('cpu', [3, 4]).randn([2, 1, 4, 4])
    known = torch.rand([2, 1, 4, 4], generator=torch.Generator().manual_seed(5)) * 2 - 1
    mask = _mask([2, 1, 4, 4])
    rnd = sampling.StackedRandomGenerator('cpu', [3, 4])
    out = sampling.inpaint(GaussianNet(), latents, known, mask, solver=solver, num_steps=5, randn_like=rnd.randn_like, **kwargs)
    rnd = sampling.StackedRandomGenerator('cpu', [3, 4])
    keep = (mask == 0).expand_as(latents)
    def fresh(x, sigma):
        value = known.double() if sigma == 0 else known.double() + sigma * rnd.randn_like(x)
        return torch.where(keep, value, x)
    sigmas = sampling.sigma_steps(5, 0.002, 80, 'edm')
    ref = solvers.solve(sampling.make_denoiser(GaussianNet()), latents.double() * 80, sigmas, solver, randn_like=rnd.randn_like,
        project=fresh, round_sigma=GaussianNet().round_sigma, **kwargs)
    assert torch.equal(out, ref)

def test_inpainting_bad_masks(unet):
    latents = torch.randn([2, 2, 8, 8])
    with pytest.raises(ValueError, match='mask: expected 0 \\(known\\) and 1 \\(generate\\) values only'):
        sampling.inpaint(unet, latents, latents, torch.full([2, 1, 8, 8], 0.5), num_steps=2)
    with pytest.raises(ValueError, match='mask: expected a tensor broadcastable to the samples'):
        sampling.inpaint(unet, latents, latents, torch.ones([2, 1, 4, 4]), num_steps=2)
    with pytest.raises(ValueError, match='needs both `known` and `mask`'):
        sampling.sample(unet, latents, known=latents, num_steps=2)

#----------------------------------------------------------------------------
# Partial-noise reconstruction: start at images + sigma_start * latents.

@torch.no_grad()
def test_reconstruct_one_euler_step_is_the_denoiser(unet):
    images = torch.rand([2, 2, 8, 8]) * 2 - 1
    latents = torch.randn([2, 2, 8, 8])
    out = sampling.reconstruct(unet, images, latents, sigma_start=0.7, solver='euler', num_steps=1)
    ref = unet((images.double() + 0.7 * latents.double()).float(), torch.tensor(0.7, dtype=torch.float64).float()).double()
    assert torch.allclose(out, ref, rtol=0, atol=1e-6) # x + (0 - sigma) (x - D) / sigma = D up to rounding.

@torch.no_grad()
@pytest.mark.parametrize('solver', ['heun', 'dpmpp_2m', 'dpmpp_3m'])
def test_reconstruct_follows_the_ode_from_sigma_start(solver):
    # Gaussian data: the ODE from sigma_start maps x to x * s / sqrt(s^2 + sigma_start^2).
    s, sigma_start = 0.5, 2.0
    images = torch.randn([3, 1, 4, 4, 4], dtype=torch.float64) * s
    latents = torch.randn([3, 1, 4, 4, 4], dtype=torch.float64)
    out = sampling.reconstruct(GaussianNet(s), images, latents, sigma_start, solver=solver, num_steps=64, sigma_min=1e-4)
    ref = (images + sigma_start * latents) * s / np.sqrt(s ** 2 + sigma_start ** 2)
    assert torch.allclose(out, ref, rtol=0, atol=2e-3)
    assert not torch.allclose(out, images, rtol=0, atol=0.1) # It did start from the noised images.

def test_reconstruct_bad_sigma_start(unet):
    images = torch.zeros([1, 2, 8, 8])
    with pytest.raises(ValueError, match='sigma_start=0.001 must exceed sigma_min=0.002'):
        sampling.reconstruct(unet, images, images, sigma_start=0.001)
    with pytest.raises(ValueError, match='sigma_start: expected a noise level'):
        sampling.reconstruct(unet, images, images, sigma_start=-1)

#----------------------------------------------------------------------------
