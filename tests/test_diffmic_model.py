# medEDM: DiffMIC networks and losses: DCG outputs, the focal weight, the
# label-space target, the cached image features of inference, seeds per image.

import re

import numpy as np
import pytest
import torch

from training import sampling
from training.diffmic import inference
from training.diffmic.dcg import DCGLoss, DCGNet
from training.diffmic.denoiser import LabelDenoiser, PooledEncoder
from training.diffmic.loss import LabelEDMLoss, guided_lambdas
from training.networks import EDMPrecond

#----------------------------------------------------------------------------

def _nets(k=3, res=16):
    torch.manual_seed(0)
    dcg = DCGNet(res, 1, k, channels=8, local_channels=8, num_patches=3, patch_size=4).eval().requires_grad_(False)
    net = EDMPrecond(res, k, model_type='VectorDenoiser', cond_channels=1, embedding_dim=3 * k, cond_type='image', cond_product=True,
        model_channels=16, num_blocks=2, encoder_channels=8, encoder_levels=2, sigma_data=0.25).eval().requires_grad_(False)
    return net, dcg

def test_dcg_outputs_are_distributions_and_the_fusion_is_their_mean():
    _, dcg = _nets()
    out = dcg(torch.randn(5, 1, 16, 16))
    for key in ('prob_global', 'prob_local', 'prob_fusion'):
        assert torch.allclose(out[key].sum(1), torch.ones(5), atol=1e-6)
    assert torch.allclose(out['prob_fusion'], (out['prob_global'] + out['prob_local']) / 2)
    assert torch.allclose(out['attention'].sum(1), torch.ones(5), atol=1e-6) and out['corners'].shape == (5, 3, 2)
    loss = DCGLoss()(dcg, dict(image=torch.randn(5, 1, 16, 16), onehot=torch.eye(3)[[0, 1, 2, 0, 1]]))
    assert loss.shape == (5,) and (loss > 0).all()

def test_focal_weight_and_residual_target():
    net, dcg = _nets()
    loss = LabelEDMLoss(focal_alpha=10, focal_gamma=1)
    images, label = torch.randn(4, 1, 16, 16), torch.eye(3)[[0, 1, 2, 2]]
    batch = loss.prepare(dict(image=images, onehot=label), dict(dcg=dcg))
    prior = dcg(images)['prob_fusion']
    assert torch.allclose(batch['residual'], label - prior) and batch['embedding'].shape == (4, 9)
    w = loss.sample_weight(batch, None, batch['residual'])
    assert torch.allclose(w, 1 + 10 * (1 - (prior * label).sum(1)))
    assert LabelEDMLoss(focal_alpha=0).sample_weight(batch, None, None) is None
    per_element = loss(net, dict(image=images, onehot=label), frozen=dict(dcg=dcg))
    assert per_element.shape == (4, 3) and torch.isfinite(per_element).all()

def test_cached_features_give_the_same_predictions_and_seeds_are_per_image():
    net, dcg = _nets()
    images = torch.randn(4, 1, 16, 16)
    sampler = sampling.check_sampler_options(dict(num_steps=3))
    a = inference.predict_batch(net, dcg, images, [0, 1, 2, 3], 3, 0, sampler, cache_features=True)
    b = inference.predict_batch(net, dcg, images, [0, 1, 2, 3], 3, 0, sampler, cache_features=False)
    assert torch.allclose(a['y0'], b['y0'], atol=1e-5) and torch.equal(a['pred'], b['pred'])
    assert net.model.map_cond.__class__.__name__ == 'ImageEncoder' # Restored.
    c = inference.predict_batch(net, dcg, images[2:], [2, 3], 3, 0, sampler) # Images 2, 3 alone: same samples.
    assert torch.allclose(c['y0'], a['y0'][2:], atol=1e-5)
    assert torch.allclose(a['probs'].sum(1), torch.ones(4)) and a['spread'].shape == (4,)
    assert ((a['agreement'] > 0) & (a['agreement'] <= 1)).all()

def test_cond_product_multiplies_the_features_in():
    net, _ = _nets()
    x, cond, emb = torch.randn(2, 3), torch.randn(2, 1, 16, 16), torch.rand(2, 9)
    with torch.no_grad():
        net.model.map_product.weight.zero_()
        net.model.map_product.bias.zero_()
        net.model.out.weight.normal_()
        # A zero product gain zeroes the vector branch: the output no longer depends on x.
        d1 = net.model(x, torch.zeros(2), cond=cond, embedding=emb)
        d2 = net.model(torch.randn(2, 3), torch.zeros(2), cond=cond, embedding=emb)
    assert torch.allclose(d1, d2)
    with pytest.raises(ValueError, match='cond_product: needs a condition'):
        EDMPrecond(16, 3, model_type='VectorDenoiser', cond_product=True)

#----------------------------------------------------------------------------
# DiffMIC-v2's guided map: a guide between y_global and y_local per map position.

def test_guided_map_lambdas_and_the_training_priors():
    assert guided_lambdas(3).tolist() == [0, 0.5, 1, 0.5, 0, 0.5, 1, 0.5, 0] # y_global on the diagonal, y_local in the corners.
    _, dcg = _nets()
    torch.manual_seed(0)
    n, loss = 1600, LabelEDMLoss(guided_map=4)
    images, label = torch.randn(1, 1, 16, 16).repeat(n, 1, 1, 1), torch.eye(3)[[1] * n]
    batch = loss.prepare(dict(image=images, onehot=label), dict(dcg=dcg))
    out = dcg(images[:1])
    g, l, fusion = out['prob_global'][0], out['prob_local'][0], out['prob_fusion'][0]
    guides = torch.stack([(1 - m / 3) * g + m / 3 * l for m in range(4)]) # Each row's prior is one of the guides (1 - lam) g + lam l ...
    dist, steps = (batch['prior'][:, None] - guides[None]).abs().amax(dim=2).min(dim=1)
    assert (dist < 1e-6).all()                       # ... with lam = |i - j| / 3 of a uniformly drawn position of the 4 x 4 map:
    shares = torch.bincount(steps, minlength=4).float() / n # 0 (4 of 16 positions), 1/3 (6), 2/3 (4), 1 (2).
    assert torch.allclose(shares, torch.tensor([4, 6, 4, 2]) / 16, atol=0.04), shares
    assert torch.allclose(batch['residual'], label - batch['prior'])
    assert torch.equal(batch['embedding'][:, :3], batch['prior']) and torch.allclose(batch['embedding'][:, 3:], torch.cat([g, l]).expand(n, 6))
    w = loss.sample_weight(batch, None, None) # v2's focal weight keeps y_fusion.
    assert torch.allclose(w, torch.full((n,), 1 + 10 * (1 - float(fusion[1]))))
    for bad in (1, -1, True, 2.0):
        with pytest.raises(ValueError, match=re.escape(f'training.loss.guided_map: expected 0 (off) or an integer np >= 2, got {bad!r}')):
            LabelEDMLoss(guided_map=bad)

def test_guided_map_at_inference_sample_j_takes_position_j_mod_np2(monkeypatch):
    net, dcg = _nets()
    images = torch.randn(2, 1, 16, 16)
    seen = {}
    def zero_residual(net, latents, embedding, **kwargs): # The denoised residual is 0: y0 = the prior of each sample.
        seen['embedding'] = embedding
        return torch.zeros_like(latents)
    monkeypatch.setattr(inference.sampling, 'sample', zero_residual)
    sampler = sampling.check_sampler_options(dict(num_steps=3))
    out = dcg(images)
    g, l = out['prob_global'], out['prob_local']
    with pytest.raises(ValueError, match=re.escape("--samples 5: the snapshot's guided map (training.loss.guided_map=2) has 4 positions; "
            'give a multiple of 4 so that the samples cover the map evenly')):
        inference.predict_batch(net, dcg, images, [0, 1], 5, 0, sampler, guided_map=2)
    res = inference.predict_batch(net, dcg, images, [0, 1], 8, 0, sampler, guided_map=2) # Map positions: lam = 0, 1, 1, 0, twice.
    for j, lam in enumerate([0, 1, 1, 0] * 2):
        assert torch.allclose(res['y0'][:, j], (1 - lam) * g + lam * l, atol=1e-6)
        assert torch.allclose(seen['embedding'].reshape(2, 8, 9)[:, j], torch.cat([(1 - lam) * g + lam * l, g, l], dim=1), atol=1e-6)
    assert torch.allclose(res['prior'], out['prob_fusion']) # The DCG's own prediction stays y_fusion.
    res = inference.predict_batch(net, dcg, images, [0, 1], 5, 0, sampler) # Off: every sample's prior is y_fusion.
    assert torch.allclose(res['y0'], out['prob_fusion'][:, None].expand(2, 5, 3))

#----------------------------------------------------------------------------
# The family's image encoder inside the denoiser: mean + top-t pooling.

def test_pooled_encoder_takes_the_mean_and_the_top_t_of_each_channel():
    enc = PooledEncoder(4, 8, channels=4, num_levels=1, percent_t=0.25)
    enc.trunk = torch.nn.Identity() # Look at the pooling alone: features = the input.
    with torch.no_grad():
        enc.out.weight.copy_(torch.eye(8))
        enc.out.bias.zero_()
    f = torch.zeros(1, 4, 4, 4)
    f[0, 1, 2, 3] = 10 # One bright position of 16 in channel 1; t = round(16 * 0.25) = 4 positions.
    out = enc(f)[0]
    assert torch.allclose(out, torch.tensor([0, 10 / 16, 0, 0, 0, 10 / 4, 0, 0])) # [mean per channel, top-t mean per channel].
    enc.percent_t = 1 # All positions: the top-t mean is the mean.
    assert torch.allclose(enc(f)[0, 4:], enc(f)[0, :4])
    with pytest.raises(ValueError, match='encoder_percent_t must be in'):
        PooledEncoder(1, 8, percent_t=0)

def test_label_denoiser_uses_the_family_encoder_and_its_cache():
    torch.manual_seed(0)
    net = LabelDenoiser(16, 3, cond_channels=1, embedding_dim=9, model_channels=16, num_blocks=2, encoder_channels=8, encoder_levels=2).eval()
    assert isinstance(net.model.map_cond, PooledEncoder) and net.model.map_product is not None # DiffMIC's f(x) product.
    _, dcg = _nets()
    images = torch.randn(4, 1, 16, 16)
    sampler = sampling.check_sampler_options(dict(num_steps=3))
    a = inference.predict_batch(net, dcg, images, [0, 1, 2, 3], 3, 0, sampler, cache_features=True)
    b = inference.predict_batch(net, dcg, images, [0, 1, 2, 3], 3, 0, sampler, cache_features=False)
    assert torch.allclose(a['y0'], b['y0'], atol=1e-5) and isinstance(net.model.map_cond, PooledEncoder)
    # Golden numbers (seed 0, CPU float32): D(x = 1, sigma = 0.5) of image 0.
    with torch.no_grad():
        net.model.out.weight.normal_(generator=torch.Generator().manual_seed(1)) # Non-zero output layer (it starts at 0).
        d = net(torch.ones(2, 3), torch.full((2,), 0.5), cond=images[:2], embedding=torch.full((2, 9), 1 / 3))
    assert d.shape == (2, 3) and torch.allclose(d[0], torch.tensor(GOLDEN_D0), atol=1e-4), d[0].tolist()
    with pytest.raises(ValueError, match='needs the image as condition'):
        LabelDenoiser(16, 3, cond_channels=0)

GOLDEN_D0 = [-0.019013, -0.252732, -0.024616]

#----------------------------------------------------------------------------
