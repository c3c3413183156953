# medEDM: the 3-D LDM's stage-1 autoencoder (training/ldm3d/autoencoder.py):
# the conditional decoder (the known region at every decoder level), its
# condition, the unconditional path, the stage-1 bound (latent.reconstruct_case)
# and the summary's pairing of the bound with the diffusion fill.

import numpy as np
import pytest
import torch

from training.ldm3d import autoencoder as ldm_ae
from training.ldm3d import data as ldm_data
from training.ldm3d import evaluation as ldm_eval
from training.ldm3d import latent as ldm_latent

SIZE = [8, 16, 8]

def _ae(cond_decoder, seed=0):
    torch.manual_seed(seed)
    ae = ldm_ae.KLAutoencoder3D(SIZE, 1, channels=[4, 8, 8], latent_channels=2, cond_decoder=cond_decoder)
    for p in ae.parameters(): # Non-zero everywhere (the blocks start as the identity).
        torch.nn.init.normal_(p, std=0.1)
    return ae.eval()

def _batch(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand([n, 1, *SIZE], generator=g) * 2 - 1
    mask = torch.zeros([n, 1, *SIZE])
    mask[:, :, 2:6, 4:10, 2:6] = 1
    voided = torch.where(mask > 0, -1.0, image)
    cond = (torch.rand([n, ldm_data.COND_CHANNELS, *SIZE], generator=g) > 0.5).float()
    return dict(image=image, voided=voided, mask=mask, harmonic=voided + mask * 0.3, cond=cond)

def test_the_conditional_decoder_sees_the_known_region_at_every_level():
    ae, b = _ae(True), _batch()
    assert ae.cond_channels == 3 + ldm_data.COND_CHANNELS == 7
    assert sorted(f for f, _ in ae.cond_at.values()) == [1, 2, 4] # Every decoder level (factor 4: three levels).
    c = ldm_ae.batch_condition(ae, b)
    assert torch.equal(c[:, 0:1], b['voided']) and torch.equal(c[:, 1:2], b['mask']) and torch.equal(c[:, 2:3], b['harmonic'])
    assert torch.equal(c[:, 3:], b['cond'])
    with torch.no_grad():
        z = ae.posterior(b['image'])[0]
        out = ae.decode(z, c)
        assert out.shape == b['image'].shape
        # The condition changes the output; the encoder does not see it (the latent of a volume does not depend on the mask).
        c2 = c.clone()
        c2[:, 2] += 0.5
        assert not torch.allclose(ae.decode(z, c2), out)
        assert torch.equal(ae(b['image'], sample=False, cond=c2)[1], z)
        # Each level's condition matters: removing the full-resolution injection changes the output.
        full = [i for i, (f, _) in ae.cond_at.items() if f == 1][0]
        saved = ae.dec_cond[str(full)].weight.clone()
        ae.dec_cond[str(full)].weight.zero_()
        ae.dec_cond[str(full)].bias.zero_()
        assert not torch.allclose(ae.decode(z, c), out)
        ae.dec_cond[str(full)].weight.copy_(saved)

def test_a_decoder_without_the_tissue_map_ignores_it():
    torch.manual_seed(0)
    ae, b = ldm_ae.KLAutoencoder3D(SIZE, 1, channels=[4, 8, 8], latent_channels=2, cond_decoder=True, decoder_tissue=False), _batch()
    assert ae.cond_channels == 3 + 1
    c = ldm_ae.batch_condition(ae, b)
    assert c.shape[1] == 4 and torch.equal(c[:, 3:], b['cond'][:, :1]) # Growth only.
    other = dict(b, cond=torch.cat([b['cond'][:, :1], 1 - b['cond'][:, 1:]], 1)) # Another tissue map.
    assert torch.equal(ldm_ae.batch_condition(ae, other), c)

def test_condition_dropout_decodes_some_samples_from_the_latent_alone():
    torch.manual_seed(0)
    ae, b = _ae(True), _batch(n=32)
    seen = []
    forward = ae.forward
    ae.forward = lambda x, sample=True, cond=None: seen.append(cond) or forward(x, sample=sample, cond=cond)
    ldm_ae.AutoencoderKLLoss(cond_dropout=0.5)(ae, b)
    full, c = ldm_ae.batch_condition(ae, b), seen[0]
    dropped = (c.flatten(1) == 0).all(1)
    assert 4 < int(dropped.sum()) < 28 # About half, each sample either all zero or the whole condition.
    assert torch.equal(c[~dropped], full[~dropped])
    ldm_ae.AutoencoderKLLoss()(ae, b)
    assert torch.equal(seen[1], full) # Default: never dropped.
    with pytest.raises(ValueError, match=r'training.loss.cond_dropout must be in \[0, 1\), got 1'):
        ldm_ae.AutoencoderKLLoss(cond_dropout=1)

def test_an_untrained_conditional_decoder_returns_the_harmonic_fill():
    torch.manual_seed(0)
    ae, b = ldm_ae.KLAutoencoder3D(SIZE, 1, channels=[4, 8, 8], latent_channels=2, cond_decoder=True), _batch()
    c = ldm_ae.batch_condition(ae, b)
    with torch.no_grad():
        assert torch.equal(ae(b['image'], cond=c)[0], b['harmonic']) # x = harmonic + dec(z, c), dec's last conv zero at the start.
        ae.dec[-1].bias.fill_(0.25)
        assert torch.allclose(ae(b['image'], cond=c)[0], b['harmonic'] + 0.25)

def test_the_conditional_decoder_refuses_a_missing_or_wrong_condition():
    ae, b = _ae(True), _batch()
    z = ae.posterior(b['image'])[0]
    with pytest.raises(ValueError, match=r'the decoder needs a condition of 7 channels \(decoder_condition\), got None'):
        ae.decode(z)
    with pytest.raises(ValueError, match=r'takes 7 channels, but the decoder condition .* has 6'):
        ldm_ae.decoder_condition(ae, b['voided'], b['mask'], b['harmonic'], b['cond'][:, :3])
    with pytest.raises(ValueError, match=r"training.network.cond_decoder: the batch has no tensor 'harmonic'"):
        ldm_ae.AutoencoderKLLoss()(ae, {k: v for k, v in b.items() if k != 'harmonic'})

def test_the_unconditional_decoder_ignores_the_batch_extras():
    ae, b = _ae(False), _batch()
    assert ae.cond_channels == 0 and ae.dec_cond is None and ldm_ae.batch_condition(ae, b) is None
    with torch.no_grad():
        z = ae.posterior(b['image'])[0]
        assert torch.equal(ae.decode(z), ae.dec(z))
    loss = ldm_ae.AutoencoderKLLoss()(ae, dict(image=b['image']))
    assert loss.shape == b['image'].shape and torch.isfinite(loss).all()

def test_stage1_loss_trains_the_decoder_condition_inside_the_mask():
    ae, b = _ae(True), _batch()
    ae.train()
    loss = ldm_ae.AutoencoderKLLoss(beta=0)(ae, b)
    assert torch.all(loss[b['mask'] == 0] == 0) and torch.all(loss[b['mask'] > 0] > 0) # The outside is pasted back: no loss there.
    loss.sum().backward()
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in ae.dec_cond.values())

def test_reconstruct_case_is_the_decoded_posterior_mean_with_the_condition():
    ae, b = _ae(True), _batch(n=1)
    ae.latent_m1.fill_(0.1)
    ae.latent_m2.fill_(0.26) # variance 0.25: scale factor 2.
    inputs = {k: v[0].numpy() for k, v in b.items()}
    rec = ldm_latent.reconstruct_case(ae, inputs)
    with torch.no_grad():
        want = ae.decode(ae.posterior(b['image'])[0], ldm_ae.batch_condition(ae, b))[0, 0].numpy()
    assert ae.scale_factor == pytest.approx(2.0) and np.allclose(rec, want, atol=1e-5)

def test_decode_voided_case_decodes_the_voided_latent_with_the_condition():
    ae, b = _ae(True), _batch(n=1)
    inputs = {k: v[0].numpy() for k, v in b.items()}
    with torch.no_grad():
        want = ae.decode(ae.posterior(b['voided'])[0], ldm_ae.batch_condition(ae, b))[0, 0].numpy()
        other = ae.decode(ae.posterior(b['image'])[0], ldm_ae.batch_condition(ae, b))[0, 0].numpy()
    got = ldm_latent.decode_voided_case(ae, inputs)
    assert np.allclose(got, want, atol=1e-6) and np.abs(got - other).max() > 1e-4 # The ground truth is not used.

def test_summary_pairs_the_bound_with_the_diffusion_fill():
    rows = []
    for i in range(4):
        for method, psnr in (('ldm', 12 + i), ('mean_fill', 5.0), ('diffusion_fill', 14.0), ('ae_bound', 15 + 0.5 * i)):
            rows.append(dict(case=f'c{i}', mask=0, method=method, **dict({m: 0.0 for m in ldm_eval.ALL_METRICS}, psnr=psnr)))
    s = ldm_eval.summarize(rows)
    assert s['ae_bound']['psnr']['mean'] == pytest.approx(15.75)
    p = s['paired']['ae_bound-diffusion_fill']['psnr']
    assert p['mean_diff'] == pytest.approx(1.75) and p['n'] == 4 and p['wins'] == 4
    assert p['se'] == pytest.approx(np.std([1, 1.5, 2, 2.5], ddof=1) / 2)
    assert s['paired']['ldm-diffusion_fill']['psnr']['mean_diff'] == pytest.approx(-0.5)
    assert 'ldm-decoder_only' not in s['paired'] and 'decoder_only' not in s # Only with a conditional decoder's rows.

def test_generic_decoding_of_a_conditional_decoder_is_refused_with_a_message():
    ae, b = _ae(True), _batch()
    z = ae.encode_latent(b['image'])
    with pytest.raises(ValueError, match=r'conditioned on the known region \(cond_decoder\): inpaint with `evaluate.py inpaint`'):
        ldm_latent.LatentInpaintLoss().decode(z, dict(autoencoder=ae))
    plain = _ae(False)
    assert ldm_latent.LatentInpaintLoss().decode(plain.encode_latent(b['image']), dict(autoencoder=plain)).shape == b['image'].shape
