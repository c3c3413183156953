# medEDM: classifier-free guidance (Ho & Salimans 2022) in the sampler:
# D = D_uncond + w (D_cond - D_uncond), unconditional = zero label vector.

import pytest
import torch

from training import networks
from training import sampling

#----------------------------------------------------------------------------

@pytest.fixture(scope='module')
def net():
    torch.manual_seed(0)
    net = networks.EDMPrecond(img_resolution=8, img_channels=1, label_dim=3, model_type='SongUNet', model_channels=8,
        channel_mult=[1], num_blocks=1, attn_resolutions=[], dropout=0, label_dropout=0.1).eval().requires_grad_(False)
    with torch.no_grad(): # An "untrained" net whose labels matter (the output layer starts near zero).
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return net

def _inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn([4, 1, 8, 8], generator=g, dtype=torch.float64) * 3
    labels = torch.eye(3)[[0, 2, 1, 2]]
    return x, torch.tensor(3.0, dtype=torch.float64), labels

@torch.no_grad()
def test_guidance_one_is_the_conditional_network(net):
    x, sigma, labels = _inputs()
    d = sampling.make_denoiser(net, class_labels=labels, guidance=1)(x, sigma)
    assert torch.equal(d, net(x.float(), sigma.float(), class_labels=labels).double())

@torch.no_grad()
def test_guidance_zero_is_the_unconditional_network(net):
    x, sigma, labels = _inputs()
    d = sampling.make_denoiser(net, class_labels=labels, guidance=0)(x, sigma)
    assert torch.equal(d, net(x.float(), sigma.float(), class_labels=torch.zeros_like(labels)).double())
    assert torch.equal(d, net(x.float(), sigma.float(), class_labels=None).double()) # None = zero vector.
    assert not torch.equal(d, net(x.float(), sigma.float(), class_labels=labels).double())

@torch.no_grad()
@pytest.mark.parametrize('w', [0.5, 2.0, 4.0])
def test_guidance_formula(net, w):
    x, sigma, labels = _inputs()
    d = sampling.make_denoiser(net, class_labels=labels, guidance=w)(x, sigma)
    d_c = net(x.float(), sigma.float(), class_labels=labels).double()
    d_u = net(x.float(), sigma.float(), class_labels=torch.zeros_like(labels)).double()
    assert torch.equal(d, d_u + w * (d_c - d_u))

@torch.no_grad()
@pytest.mark.parametrize('solver', ['heun', 'dpmpp_2m'])
def test_guided_sampling_endpoints(net, solver):
    latents = torch.randn([4, 1, 8, 8], generator=torch.Generator().manual_seed(2))
    _, _, labels = _inputs()
    kw = dict(solver=solver, num_steps=4)
    plain = sampling.sample(net, latents, class_labels=labels, **kw)
    assert torch.equal(sampling.sample(net, latents, class_labels=labels, guidance=1, **kw), plain)
    uncond = sampling.sample(net, latents, class_labels=torch.zeros_like(labels), **kw)
    assert torch.equal(sampling.sample(net, latents, class_labels=labels, guidance=0, **kw), uncond)
    guided = sampling.sample(net, latents, class_labels=labels, guidance=3, **kw)
    assert not torch.equal(guided, plain) and torch.isfinite(guided).all()

def test_guidance_needs_labels(net):
    uncond_net = networks.EDMPrecond(img_resolution=8, img_channels=1, model_type='SongUNet', model_channels=8,
        channel_mult=[1], num_blocks=1, attn_resolutions=[])
    with pytest.raises(ValueError, match='guidance=2: classifier-free guidance needs a class-conditional network'):
        sampling.make_denoiser(uncond_net, guidance=2)
    with pytest.raises(ValueError, match='guidance=0: classifier-free guidance needs class labels'):
        sampling.make_denoiser(net, class_labels=None, guidance=0)
    sampling.make_denoiser(uncond_net, guidance=1) # No guidance: fine.
    no_dropout = networks.EDMPrecond(img_resolution=8, img_channels=1, label_dim=3, model_type='SongUNet', model_channels=8,
        channel_mult=[1], num_blocks=1, attn_resolutions=[])
    with pytest.raises(ValueError, match=r'guidance=2: the network was trained without label dropout \(label_dropout=0\), so it never '
            r'learned the unconditional case that guidance extrapolates from; train with label_dropout > 0 or use guidance=1'):
        sampling.make_denoiser(no_dropout, class_labels=torch.eye(3), guidance=2)
    with pytest.raises(ValueError, match=r'sampling.guidance=0: the network was trained without label dropout'):
        sampling.check_guidance(sampling.PerSampleNet(no_dropout), 0, key='sampling.guidance') # Seen through generate.py's wrapper.

#----------------------------------------------------------------------------
