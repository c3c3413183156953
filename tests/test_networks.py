# medEDM: tests of training/layers.py and training/networks.py.

import ast
import io
import math
import os
import pickle

import pytest
import torch

from torch_utils import persistence
from training import layers, networks
from training.networks import DhariwalUNet, EDMPrecond, SongUNet, VEPrecond, VPPrecond

KEYS_FILE = os.path.join(os.path.dirname(__file__), 'data', 'edm_network_state_dict_keys.txt')

# Small networks that run in well under a second on CPU.
SMALL = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0.0)

#----------------------------------------------------------------------------
# Reference listing of NVlabs/edm state dicts.

def _parse_keys_file():
    configs = []
    with open(KEYS_FILE) as f:
        for line in f:
            line = line.rstrip('\n')
            if line.startswith('## total parameters+buffers'):
                configs[-1]['total'] = int(line.split()[-1])
            elif line.startswith('## '):
                name, call = line[3:].split(' ', 1)
                configs.append(dict(name=name, call=call, keys=[], total=None))
            elif line.strip():
                key, shape = line.split(' ', 1)
                configs[-1]['keys'].append((key, tuple(ast.literal_eval(shape))))
    return configs

def _build_from_call(call):
    # Build the network from a header like "EDMPrecond(img_resolution=16, ...)" without eval().
    node = ast.parse(call, mode='eval').body
    assert isinstance(node, ast.Call) and not node.args
    cls = getattr(networks, node.func.id)
    return cls(**{kw.arg: ast.literal_eval(kw.value) for kw in node.keywords})

KEY_CONFIGS = _parse_keys_file()

def test_keys_file_has_both_configs():
    assert [c['name'] for c in KEY_CONFIGS] == ['songunet_ddpmpp_small', 'dhariwalunet_small']
    assert all(c['total'] is not None and c['keys'] for c in KEY_CONFIGS)

@pytest.mark.parametrize('config', KEY_CONFIGS, ids=[c['name'] for c in KEY_CONFIGS])
def test_state_dict_matches_edm(config):
    net = _build_from_call(config['call'])
    sd = net.state_dict()
    got = [(k, tuple(v.shape)) for k, v in sd.items()]
    assert [k for k, _ in got] == [k for k, _ in config['keys']] # Same keys, same order.
    assert got == config['keys']                                 # Same shapes.
    assert sum(v.numel() for v in sd.values()) == config['total']

#----------------------------------------------------------------------------
# Preconditioning coefficients (Table 1).

class _StubModel(torch.nn.Module):
    # Records the inputs of the inner model and returns ones.
    def forward(self, x, noise_labels, class_labels=None, augment_labels=None, embedding=None):
        self.x, self.noise_labels = x, noise_labels
        return torch.ones_like(x[:, :1]).expand(-1, 1, -1, -1).repeat(1, self.out_channels, 1, 1)

def _stubbed(net):
    net.model = _StubModel()
    net.model.out_channels = net.img_channels
    return net

def test_edm_coefficients_golden():
    net = EDMPrecond(img_resolution=8, img_channels=1, model_type='SongUNet', **SMALL)
    c_skip, c_out, c_in, c_noise = net.coefficients(1.0)
    assert float(c_skip) == pytest.approx(0.2, abs=1e-7)
    assert float(c_out) == pytest.approx(0.4472136, abs=1e-7)
    assert float(c_in) == pytest.approx(0.8944272, abs=1e-7)
    assert float(c_noise) == 0

    # The same through forward() with a stub inner model returning F = 1.
    net = _stubbed(net)
    x = torch.full([2, 1, 8, 8], 3.0)
    d = net(x, 1.0)
    assert d.dtype == torch.float32
    torch.testing.assert_close(d, torch.full_like(x, 0.2 * 3 + 0.4472136), rtol=0, atol=1e-6)
    torch.testing.assert_close(net.model.x, torch.full_like(x, 3 * 0.8944272), rtol=0, atol=1e-6)
    assert net.model.noise_labels.shape == (2,) and torch.all(net.model.noise_labels == 0)

def test_vp_coefficients_and_schedule():
    net = VPPrecond(img_resolution=8, img_channels=1, **SMALL)
    t = torch.tensor([1e-5, 0.01, 0.3, 0.7, 1.0], dtype=torch.float64)
    sigma = net.sigma(t)
    torch.testing.assert_close(net.sigma_inv(sigma), t, rtol=1e-6, atol=1e-9)
    expected = torch.sqrt(torch.exp(0.5 * 19.9 * t ** 2 + 0.1 * t) - 1)
    torch.testing.assert_close(sigma, expected)
    # EDM computes these in float32 as exp() - 1 and log(1 + sigma^2) (not expm1 / log1p); VP networks
    # trained with EDM saw that rounding, so the same values here (golden numbers of EDM's formula):
    assert net.sigma_min == 0.0009765625 # float64 would give 0.0010005.
    assert float(net.noise_label(torch.tensor(0.002))) == pytest.approx(0.0403283, abs=1e-6) # log1p: 0.03980.
    assert net.sigma_max == pytest.approx(math.sqrt(math.exp(0.5 * 19.9 + 0.1) - 1)) # ~152.
    c_skip, c_out, c_in, c_noise = net.coefficients(sigma.float())
    assert torch.all(c_skip == 1)
    torch.testing.assert_close(c_out, -sigma.float())
    torch.testing.assert_close(c_in, 1 / torch.sqrt(sigma.float() ** 2 + 1))
    torch.testing.assert_close(c_noise, 999 * t.float(), rtol=1e-4, atol=1e-3)

def test_ve_coefficients_and_range():
    net = VEPrecond(img_resolution=8, img_channels=1, **SMALL)
    assert (net.sigma_min, net.sigma_max) == (0.02, 100)
    c_skip, c_out, c_in, c_noise = net.coefficients(torch.tensor([2.0, 0.02]))
    assert torch.all(c_skip == 1) and torch.all(c_in == 1)
    torch.testing.assert_close(c_out, torch.tensor([2.0, 0.02]))
    torch.testing.assert_close(c_noise, torch.tensor([0.0, math.log(0.01)]))
    assert torch.equal(net.round_sigma(torch.tensor(0.5)), torch.tensor(0.5))

def test_bad_model_type():
    with pytest.raises(ValueError, match='model_type'):
        EDMPrecond(img_resolution=8, img_channels=1, model_type='UNet3D')

@pytest.mark.parametrize('kwargs, name', [
    (dict(embedding_type='sinusoidal'), 'embedding_type'),
    (dict(encoder_type='pyramid'), 'encoder_type'),
    (dict(decoder_type='residual'), 'decoder_type'),
])
def test_bad_songunet_types(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SongUNet(img_resolution=8, in_channels=1, out_channels=1, **SMALL, **kwargs)

#----------------------------------------------------------------------------
# Sigma broadcasting, per-pixel sigma.

def test_sigma_shapes_agree():
    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=8, img_channels=2, model_type='SongUNet', **SMALL).eval()
    x = torch.randn(3, 2, 8, 8)
    s = torch.tensor([0.3, 0.3, 0.3])
    ref = net(x, s)
    for sigma in [0.3, torch.tensor(0.3), s.reshape(3, 1, 1, 1), torch.full([3, 1, 8, 8], 0.3), torch.full([3, 2, 8, 8], 0.3)]:
        torch.testing.assert_close(net(x, sigma), ref, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match='sigma'):
        net(x, torch.ones(2))

def test_per_pixel_sigma_zero_region_is_identity():
    torch.manual_seed(0)
    for model_type in ['SongUNet', 'DhariwalUNet']:
        net = EDMPrecond(img_resolution=8, img_channels=3, model_type=model_type, **SMALL)
        with torch.no_grad(): # Make F(x) clearly nonzero.
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        x = torch.randn(2, 3, 8, 8)
        sigma = torch.full([2, 1, 8, 8], 2.0)
        sigma[:, :, :4] = 0 # Top half known exactly.
        sigma[1] = 0        # Second sample entirely known: c_noise uses the clamped max.
        d = net(x, sigma)
        assert torch.isfinite(d).all()
        assert torch.equal(d[:, :, :4], x[:, :, :4])
        assert torch.equal(d[1], x[1])
        assert not torch.allclose(d[0, :, 4:], x[0, :, 4:])

def test_per_pixel_c_noise_is_per_sample_max():
    net = _stubbed(EDMPrecond(img_resolution=8, img_channels=1, model_type='SongUNet', **SMALL))
    sigma = torch.zeros([2, 1, 8, 8])
    sigma[0, 0, 3, 3] = math.e ** 4
    sigma[1, 0, 1, 1] = 1.0
    sigma[1, 0, 2, 2] = 0.5
    d = net(torch.ones([2, 1, 8, 8]), sigma)
    torch.testing.assert_close(net.model.noise_labels, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(net.model.x[:, :, 3, 3], torch.tensor([[1 / math.sqrt(0.25 + math.e ** 8)], [2.0]]))
    assert torch.equal(d[:, :, 0, 0], torch.ones(2, 1))

#----------------------------------------------------------------------------
# Medical extensions: condition images, embedding vectors, labels, channels.

def test_cond_channels():
    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=8, img_channels=1, model_type='SongUNet', cond_channels=2, **SMALL)
    x, cond = torch.randn(2, 1, 8, 8), torch.randn(2, 2, 8, 8)
    assert net(x, torch.ones(2), cond=cond).shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match='cond'):
        net(x, torch.ones(2))
    with pytest.raises(ValueError, match=r'\(2, 2, 8, 8\).*\(2, 3, 8, 8\)'):
        net(x, torch.ones(2), cond=torch.randn(2, 3, 8, 8))
    plain = EDMPrecond(img_resolution=8, img_channels=1, model_type='SongUNet', **SMALL)
    with pytest.raises(ValueError, match='cond_channels=0'):
        plain(x, torch.ones(2), cond=cond)
    _assert_same_keys(net, plain, differing={'model.enc.8x8_conv.weight'})

    # The stub sees [c_in x, cond] with cond unscaled.
    net = _stubbed(net)
    net(x, torch.ones(2), cond=cond)
    torch.testing.assert_close(net.model.x[:, :1], x * (1 / math.sqrt(1.25)))
    assert torch.equal(net.model.x[:, 1:], cond)

def test_cond_offset_is_edm_on_the_residual():
    # cond_offset: D(x; sigma, c) = o + D_plain(x - o; sigma, c) with the same weights, o = c[:, :img_channels];
    # where sigma = 0 it is still exactly x.
    torch.manual_seed(0)
    kwargs = dict(img_resolution=8, img_channels=1, model_type='SongUNet', cond_channels=2, sigma_data=0.1, **SMALL)
    plain, offset = EDMPrecond(**kwargs), EDMPrecond(cond_offset=True, **kwargs)
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    offset.load_state_dict(plain.state_dict())
    x, cond = torch.randn(3, 1, 8, 8), torch.randn(3, 2, 8, 8)
    for sigma in [torch.tensor([0.01, 0.3, 80.0]), torch.full([3, 1, 8, 8], 0.5)]:
        o = cond[:, :1]
        ref = o + plain(x - o, sigma, cond=cond)
        torch.testing.assert_close(offset(x, sigma, cond=cond), ref, rtol=0, atol=1e-6)
        assert not torch.allclose(plain(x, sigma, cond=cond), ref, atol=1e-3)
    sigma = torch.full([3, 1, 8, 8], 2.0)
    sigma[:, :, :4] = 0
    assert torch.equal(offset(x, sigma, cond=cond)[:, :, :4], x[:, :, :4])
    # At sigma -> 0 the denoiser tends to x; at large sigma to o + c_out F (the residual's scale, sigma_data).
    torch.testing.assert_close(offset(x, torch.full([3], 1e-6), cond=cond), x, rtol=0, atol=1e-5)

def test_cond_offset_needs_a_condition_image():
    with pytest.raises(ValueError, match=r'^cond_offset: needs a condition image with at least img_channels=2 channels concatenated to the input, got cond_channels=1$'):
        EDMPrecond(img_resolution=8, img_channels=2, model_type='SongUNet', cond_channels=1, cond_offset=True, **SMALL)
    with pytest.raises(ValueError, match='got cond_channels=0'):
        EDMPrecond(img_resolution=8, img_channels=1, model_type='SongUNet', cond_offset=True, **SMALL)
    with pytest.raises(ValueError, match=r"^cond_offset: expected true or false, got 'false'$"):
        EDMPrecond(img_resolution=8, img_channels=1, model_type='SongUNet', cond_channels=1, cond_offset='false', **SMALL)
    net = EDMPrecond(img_resolution=8, img_channels=1, model_type='SongUNet', cond_channels=1, cond_offset=True, **SMALL)
    with pytest.raises(ValueError, match=r'cond: expected shape \(2, 1, 8, 8\) for x of shape \(2, 1, 8, 8\), got \(2, 1, 16, 16\)'):
        net(torch.randn(2, 1, 8, 8), torch.ones(2), cond=torch.randn(2, 1, 16, 16))    # The shape message, not a broadcast error.

def _assert_same_keys(a, b, differing):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa.keys()) == list(sb.keys())
    assert {k for k in sa if sa[k].shape != sb[k].shape} == differing

@pytest.mark.parametrize('model_type', ['SongUNet', 'DhariwalUNet'])
def test_embedding_dim(model_type):
    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=8, img_channels=1, model_type=model_type, embedding_dim=5, **SMALL)
    plain = EDMPrecond(img_resolution=8, img_channels=1, model_type=model_type, **SMALL)
    _assert_same_keys(net, plain, differing={'model.map_layer0.weight'})
    assert net.model.map_layer0.weight.shape[1] == plain.model.map_layer0.weight.shape[1] + 5
    x = torch.randn(2, 1, 8, 8)
    emb = torch.randn(2, 5)
    assert net(x, torch.ones(2), embedding=emb).shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match='embedding'):
        net(x, torch.ones(2))
    with pytest.raises(ValueError, match='embedding'):
        net(x, torch.ones(2), embedding=torch.randn(2, 4))
    with pytest.raises(ValueError, match='embedding_dim=0'):
        plain(x, torch.ones(2), embedding=emb)

@pytest.mark.parametrize('model_type', ['SongUNet', 'DhariwalUNet'])
def test_missing_class_labels_are_zeros(model_type):
    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=8, img_channels=1, label_dim=4, model_type=model_type, **SMALL).eval()
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(net(x, 0.7), net(x, 0.7, class_labels=torch.zeros(2, 4)))
    with pytest.raises(ValueError, match='class_labels'):
        net(x, 0.7, class_labels=torch.zeros(2, 3))

@pytest.mark.parametrize('img_channels', [1, 2, 3, 5])
@pytest.mark.parametrize('precond', [EDMPrecond, VPPrecond, VEPrecond])
def test_any_channel_count(precond, img_channels):
    net = precond(img_resolution=8, img_channels=img_channels, model_type='SongUNet', use_fp16=True, **SMALL)
    d = net(torch.randn(2, img_channels, 8, 8), torch.tensor([0.5, 5.0]))
    assert d.shape == (2, img_channels, 8, 8) and d.dtype == torch.float32 # use_fp16 is CUDA-only.

#----------------------------------------------------------------------------
# Architecture variants.

@pytest.mark.parametrize('embedding_type, channel_mult_noise, encoder_type, decoder_type, resample_filter', [
    ('positional', 1, 'standard', 'standard', [1, 1]), # DDPM++.
    ('fourier',    2, 'residual', 'standard', [1, 3, 3, 1]), # NCSN++.
    ('positional', 1, 'skip',     'skip',     [1, 1]),
    ('fourier',    1, 'residual', 'skip',     [1, 3, 3, 1]),
    ('fourier',    2, 'skip',     'standard', [1, 3, 3, 1]),
])
def test_songunet_variants(embedding_type, channel_mult_noise, encoder_type, decoder_type, resample_filter):
    torch.manual_seed(0)
    net = SongUNet(img_resolution=16, in_channels=3, out_channels=3, label_dim=2, augment_dim=9, model_channels=16,
        channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[8], embedding_type=embedding_type,
        channel_mult_noise=channel_mult_noise, encoder_type=encoder_type, decoder_type=decoder_type, resample_filter=resample_filter)
    x = torch.randn(2, 3, 16, 16)
    y = net(x, torch.tensor([0.1, -0.3]), torch.eye(2), augment_labels=torch.randn(2, 9))
    assert y.shape == (2, 3, 16, 16) and y.dtype == torch.float32 and torch.isfinite(y).all()
    if embedding_type == 'fourier':
        assert net.map_noise.freqs.shape == (16 * channel_mult_noise // 2,)
    names = list(net.enc.keys()) + list(net.dec.keys())
    assert any('aux_skip' in k for k in names) == (encoder_type == 'skip')
    assert any('aux_residual' in k for k in names) == (encoder_type == 'residual')
    assert any('aux_up' in k for k in names) == (decoder_type == 'skip')

def test_dhariwalunet_labels_and_augment():
    torch.manual_seed(0)
    net = DhariwalUNet(img_resolution=16, in_channels=3, out_channels=3, label_dim=10, augment_dim=9, model_channels=16,
        channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], label_dropout=0.5)
    assert net.map_augment.bias is None and net.map_label.bias is None
    labels = torch.nn.functional.one_hot(torch.tensor([1, 7]), 10).float()
    y = net(torch.randn(2, 3, 16, 16), torch.tensor([0.2, -0.1]), labels, augment_labels=torch.randn(2, 9))
    assert y.shape == (2, 3, 16, 16) and torch.isfinite(y).all()

def test_attention_heads():
    # ADM: heads = channels // 64, so narrow blocks have no attention layers at all.
    assert layers.UNetBlock(16, 128, emb_channels=8, attention=True).num_heads == 2
    assert not hasattr(layers.UNetBlock(16, 32, emb_channels=8, attention=True), 'qkv')
    q = torch.randn(2, 4, 6, dtype=torch.float64)
    w = layers.attention_weights(q, q)
    assert w.dtype == torch.float64 and torch.allclose(w.sum(2), torch.ones(2, 6, dtype=torch.float64))
    # fp16 (CUDA networks with use_fp16): k is scaled in fp16, then cast, as in EDM; with 3 channels
    # (sqrt(3) not a power of two) the other order rounds differently.
    q, k = (torch.randn(1, 3, 64, generator=torch.Generator().manual_seed(s)).mul(4).half() for s in (1, 2))
    logits = lambda k32: torch.einsum('ncq,nck->nqk', q.float(), k32)
    edm = torch.softmax(logits((k / math.sqrt(3)).float()), dim=2).half()
    other = torch.softmax(logits(k.float() / math.sqrt(3)), dim=2).half()
    assert torch.equal(layers.attention_weights(q, k), edm) and not torch.equal(edm, other)

def test_layers():
    with pytest.raises(ValueError, match='mode'):
        layers.weight_init([2, 2], mode='orthogonal', fan_in=2, fan_out=2)
    conv = layers.Conv2d(4, 4, kernel=3, down=True, resample_filter=[1, 3, 3, 1])
    torch.testing.assert_close(conv.resample_filter.sum(), torch.tensor(1.0))
    assert conv.resample_filter.shape == (1, 1, 4, 4)
    assert 'resample_filter' not in layers.Conv2d(4, 4, kernel=3).state_dict()
    for fused in [False, True]:
        for kw in [dict(up=True), dict(down=True)]:
            for f in [[1, 1], [1, 3, 3, 1]]:
                out = layers.Conv2d(4, 6, kernel=3, resample_filter=f, fused_resample=fused, **kw)(torch.randn(1, 4, 8, 8))
                assert out.shape == (1, 6, 16 if 'up' in kw else 4, 16 if 'up' in kw else 4)
    assert layers.GroupNorm(48).num_groups == 12 and layers.GroupNorm(256).num_groups == 32

#----------------------------------------------------------------------------
# Gradients, batch invariance, snapshot round trip.

@pytest.mark.parametrize('model_type', ['SongUNet', 'DhariwalUNet'])
def test_gradients_flow(model_type):
    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=8, img_channels=2, label_dim=3, model_type=model_type, cond_channels=1, embedding_dim=4, **SMALL).train()
    x = torch.randn(2, 2, 8, 8, requires_grad=True)
    d = net(x, torch.tensor([0.5, 3.0]), class_labels=torch.eye(3)[:2], cond=torch.randn(2, 1, 8, 8), embedding=torch.randn(2, 4))
    assert d.dtype == torch.float32
    d.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    grads = {k: p.grad for k, p in net.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    last = 'model.dec.8x8_aux_conv.weight' if model_type == 'SongUNet' else 'model.out_conv.weight'
    assert grads[last].abs().sum() > 0

@pytest.mark.parametrize('model_type', ['SongUNet', 'DhariwalUNet'])
def test_batch_invariance(model_type):
    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=16, img_channels=3, label_dim=2, model_type=model_type, model_channels=16,
        channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0.1).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        x = torch.randn(4, 3, 16, 16)
        sigma = torch.tensor([0.01, 0.5, 2.0, 40.0])
        labels = torch.eye(2)[[0, 1, 1, 0]]
        batch = net(x, sigma, class_labels=labels)
        single = torch.cat([net(x[i:i+1], sigma[i:i+1], class_labels=labels[i:i+1]) for i in range(4)])
    # Bit-exact where the CPU kernels allow; oneDNN's 3x3 convolution and BLAS gemm vs gemv pick
    # different summation orders for batch 4 and batch 1, which gives float32 rounding (~1e-6) only.
    diff = (batch - single).abs().max().item()
    assert torch.equal(batch, single) or torch.allclose(batch, single, rtol=1e-5, atol=1e-5), f'max |diff| = {diff:.3g}'

@pytest.mark.parametrize('precond', [EDMPrecond, VPPrecond, VEPrecond])
def test_pickle_round_trip(precond):
    torch.manual_seed(0)
    net = precond(img_resolution=8, img_channels=2, label_dim=3, model_type='SongUNet', cond_channels=1, embedding_dim=2,
        embedding_type='fourier', channel_mult_noise=2, encoder_type='residual', resample_filter=[1, 3, 3, 1], **SMALL).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    net2 = persistence.RestrictedUnpickler(io.BytesIO(pickle.dumps(net))).load()
    assert type(net2) is precond and not net2.training
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), net2.state_dict().values()))
    args = (torch.randn(2, 2, 8, 8), torch.tensor([0.3, 4.0]))
    kwargs = dict(class_labels=torch.eye(3)[:2], cond=torch.randn(2, 1, 8, 8), embedding=torch.randn(2, 2))
    with torch.no_grad():
        assert torch.equal(net(*args, **kwargs), net2(*args, **kwargs))
    assert (net2.sigma_min, net2.sigma_max, net2.img_channels, net2.label_dim) == (net.sigma_min, net.sigma_max, 2, 3)

#----------------------------------------------------------------------------
