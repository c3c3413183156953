# medEDM: loss objects with parts (noise source, per-pixel sigma map, mask,
# distance, per-sample weight, target key, embedding) and an
# embedding-conditioned network that trains in the loop and samples.

import glob
import math
import os
import re
import sys

import numpy as np
import pytest
import torch

import launch
from torch_utils import misc
from torch_utils import persistence
from training import augment
from training import loss as loss_lib
from training import networks
from training import sampling
from training import training_loop

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'helpers')) # embedding_dataset

pytestmark = pytest.mark.usefixtures('one_thread')

#----------------------------------------------------------------------------
# Toy denoisers: D(x) = scale * x; they record what the loss gives them.

class Scale(torch.nn.Module):
    def __init__(self, scale: float = 0.5):
        super().__init__()
        self.scale = scale

    def forward(self, x, sigma, **kwargs):
        self.sigma, self.kwargs = sigma, kwargs
        return self.scale * x

def _images(n=4, c=2, res=8, seed=5):
    return torch.randn([n, c, res, res], generator=torch.Generator().manual_seed(seed))

def _tiny_edm(**kwargs):
    torch.manual_seed(0)
    return networks.EDMPrecond(img_resolution=8, img_channels=1, label_dim=0, model_type='SongUNet', model_channels=8,
        channel_mult=[1], num_blocks=1, attn_resolutions=[], dropout=0.0, **kwargs)

# lambda(1) of EDM with sigma_data 0.5: (1 + 0.25) / 0.25.
LAMBDA_1 = 5.0

def _sigma_one(**parts): # EDMLoss with sigma = exp(0 * randn + 0) = 1 exactly.
    return loss_lib.EDMLoss(P_mean=0, P_std=0, **parts)

#----------------------------------------------------------------------------
# The default losses are those of NVlabs/edm: values pinned on fixed seeds
# (computed with the loss.py before it had parts), with and without the
# augment pipe (sigma is drawn before the augmentation, the noise after).

@pytest.mark.parametrize('name, augmented, total, elements', [
    ('EDMLoss', False, 1413.540098, [10.724302, 4.631607, 1.272255]),
    ('EDMLoss', True,  857.433836,  [2.99284, 2.333047, 0.027519]),
    ('VPLoss',  False, 217.779502,  [1.115693, 0.630914, 0.02054]),
    ('VPLoss',  True,  166.855987,  [0.233329, 0.001004, 0.284144]),
    ('VELoss',  False, 868.778448,  [0.015048, 0.11756, 2.102797]),
    ('VELoss',  True,  477.952624,  [0.040051, 0.202053, 0.396469]),
])
def test_default_losses_golden(name, augmented, total, elements):
    pipe = augment.AugmentPipe(p=1, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1) if augmented else None
    torch.manual_seed(1)
    loss = getattr(loss_lib, name)()(Scale(0.5), dict(image=_images()), augment_pipe=pipe).double()
    assert loss.shape == (4, 2, 8, 8)
    assert loss.sum().item() == pytest.approx(total, rel=1e-6)
    assert loss.flatten()[[0, 100, 255]].tolist() == pytest.approx(elements, rel=1e-5, abs=1e-6)

#----------------------------------------------------------------------------
# Per-pixel sigma that is 0 outside a box (patched DDPM): finite, exactly 0
# outside, and the gradient is finite too.

def _box(n=2, res=8, lo=2, hi=6):
    M = torch.zeros([n, 1, res, res])
    M[:, :, lo:hi, lo:hi] = 1
    return M

class BoxLoss(loss_lib.EDMLoss):
    def sigma_map(self, batch, y):
        return _box(y.shape[0], y.shape[-1])

class BoxSigmaLoss(loss_lib.EDMLoss): # The same, written as a per-pixel sample_sigma (works without the sigma_map part).
    def sample_sigma(self, shape, device):
        return super().sample_sigma(shape, device) * _box(shape[0])

@pytest.mark.parametrize('cls', [BoxLoss, BoxSigmaLoss])
def test_box_sigma_map_is_finite_and_zero_outside(cls):
    net = _tiny_edm()
    torch.manual_seed(2)
    loss = cls()(net, dict(image=_images(n=2, c=1)))
    inside = _box().bool().expand_as(loss)
    assert torch.isfinite(loss).all()
    assert torch.equal(loss[~inside], torch.zeros_like(loss[~inside]))
    assert (loss[inside] > 0).all()
    loss.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)

def test_box_sigma_map_noises_only_the_box():
    net = Scale(1.0) # D(x) = x: the loss is lambda(sigma) |n|, the noised input is y + n.
    loss_fn = BoxLoss(distance='l1')
    torch.manual_seed(2)
    y = _images(n=2, c=1)
    loss_fn(net, dict(image=y))
    box = _box().bool()
    assert net.sigma.shape == (2, 1, 8, 8) and torch.equal(net.sigma[~box], torch.zeros_like(net.sigma[~box]))
    assert (net.sigma[box] > 0).all() and (net.sigma[0][box[0]] == net.sigma[0, 0, 2, 2]).all() # One sigma per sample inside.

def test_sigma_map_of_wrong_shape_is_refused():
    class Bad(loss_lib.EDMLoss):
        def sigma_map(self, batch, y):
            return torch.ones([y.shape[0], 1, 4, 4])
    with pytest.raises(ValueError, match=re.escape('training.loss: the sigma map of shape (2, 1, 4, 4) does not broadcast to the target of shape (2, 1, 8, 8)')):
        Bad()(Scale(), dict(image=_images(n=2, c=1)))

#----------------------------------------------------------------------------
# Mask in which the loss is taken.

def test_masked_l1_box_loss_is_finite_and_zero_outside_mask():
    # Per-pixel sigma (box), L1, loss inside a mask that is smaller than the box, on the real preconditioner.
    mask = torch.zeros([2, 1, 8, 8])
    mask[:, :, 3:5, 2:6] = 1
    torch.manual_seed(3)
    loss = BoxLoss(distance='l1', mask_key='mask')(_tiny_edm(), dict(image=_images(n=2, c=1), mask=mask))
    inside = mask.bool()
    assert torch.isfinite(loss).all()
    assert torch.equal(loss[~inside], torch.zeros_like(loss[~inside]))
    assert (loss[inside] > 0).all()

def test_masked_out_elements_are_exactly_zero_even_where_the_network_is_not_finite():
    class Wild(Scale):
        def forward(self, x, sigma, **kwargs):
            return torch.where(mask.bool(), x, torch.full_like(x, float('nan')))
    mask = (torch.arange(64).reshape(1, 1, 8, 8) % 3 == 0).float().expand(4, 1, 8, 8)
    y = _images()
    torch.manual_seed(4)
    loss = loss_lib.EDMLoss(mask_key='mask', distance='l1')(Wild(), dict(image=y, mask=mask))
    torch.manual_seed(4)
    plain = loss_lib.EDMLoss(distance='l1')(Scale(1.0), dict(image=y)) # Same sigma and noise, D(x) = x.
    inside = mask.bool().expand_as(loss)
    assert torch.isfinite(loss).all() and torch.equal(loss[~inside], torch.zeros_like(loss[~inside]))
    assert torch.equal(loss[inside], plain[inside])

def test_missing_or_misshapen_mask_is_refused():
    with pytest.raises(ValueError, match=re.escape("training.loss.mask_key='mask': the batch has no tensor 'mask' (keys: image)")):
        loss_lib.EDMLoss(mask_key='mask')(Scale(), dict(image=_images()))
    with pytest.raises(ValueError, match=re.escape("training.loss: batch['mask'] of shape (4, 1, 4, 4) does not broadcast")):
        loss_lib.EDMLoss(mask_key='mask')(Scale(), dict(image=_images(), mask=torch.ones([4, 1, 4, 4])))

#----------------------------------------------------------------------------
# Distance, noise source, per-sample weight, target key: hand-computed values
# with sigma = 1 (lambda = 5).

Y = torch.tensor([[[[1.0, -2.0], [0.5, 3.0]]]])

def test_l2_and_l1_distance_hand_computed():
    zero = Scale(0.0) # D = 0: D - y = -y.
    assert torch.equal(_sigma_one()(zero, dict(image=Y)), LAMBDA_1 * torch.tensor([[[[1.0, 4.0], [0.25, 9.0]]]]))
    assert torch.equal(_sigma_one(distance='l1')(zero, dict(image=Y)), LAMBDA_1 * torch.tensor([[[[1.0, 2.0], [0.5, 3.0]]]]))
    with pytest.raises(ValueError, match="training.loss.distance: expected 'l2' or 'l1', got 'l3'"):
        loss_lib.EDMLoss(distance='l3')

def test_registered_noise_source_is_used():
    loss_lib.register_noise('test_twos', lambda y: torch.full_like(y, 2.0))
    ident = Scale(1.0) # D(y + n) - y = n = sigma * 2.
    assert torch.equal(_sigma_one(noise='test_twos')(ident, dict(image=Y)), torch.full_like(Y, LAMBDA_1 * 4))
    assert torch.equal(_sigma_one(noise='test_twos', distance='l1')(ident, dict(image=Y)), torch.full_like(Y, LAMBDA_1 * 2))
    torch.manual_seed(0)
    gaussian = _sigma_one()(ident, dict(image=_images()))
    torch.manual_seed(0)
    torch.randn([4, 1, 1, 1]) # sigma's draw comes first.
    assert torch.allclose(gaussian, LAMBDA_1 * torch.randn([4, 2, 8, 8]) ** 2, rtol=1e-5, atol=1e-5)
    # Families register their own sources when their package is imported (anomaly: 'simplex'), so the list may hold more.
    with pytest.raises(ValueError, match=r"^training\.loss\.noise='no_such_noise': unknown noise source \(registered: gaussian, (\w+, )*test_twos(, \w+)*\); "
            r"a family registers its own with training\.loss\.register_noise$"):
        _sigma_one(noise='no_such_noise')(ident, dict(image=Y))

def test_sample_weight_scales_each_sample():
    class Focal(loss_lib.EDMLoss): # DiffMIC's focal weight 1 + alpha (1 - p_true)^gamma, alpha 10, gamma 1.
        def sample_weight(self, batch, D, y):
            return 1 + 10 * (1 - batch['p_true'])
    p_true = torch.tensor([1.0, 0.5, 0.9, 0.0])
    y = _images()
    torch.manual_seed(6)
    weighted = Focal()(Scale(0.5), dict(image=y, p_true=p_true))
    torch.manual_seed(6)
    plain = loss_lib.EDMLoss()(Scale(0.5), dict(image=y))
    for i, w in enumerate([1.0, 6.0, 2.0, 11.0]):
        assert torch.allclose(weighted[i], plain[i] * w, rtol=1e-6, atol=0)
    assert torch.equal(weighted[0], plain[0])

def test_target_key_picks_another_batch_key():
    residual = torch.tensor([[0.5, -1.0, 2.0], [0.0, 1.0, -3.0]]) # A (N, K) label-space target.
    image = torch.full([2, 1, 4, 4], 7.0)
    net = Scale(0.0)
    loss = _sigma_one(target_key='residual')(net, dict(image=image, residual=residual))
    assert torch.equal(loss, LAMBDA_1 * residual ** 2)
    assert net.sigma.shape == (2, 1)
    with pytest.raises(ValueError, match=re.escape("training.loss.target_key='y0': the batch has no tensor 'y0' (keys: image, residual)")):
        _sigma_one(target_key='y0')(net, dict(image=image, residual=residual))

def test_condition_and_embedding_reach_the_network():
    net = Scale()
    batch = dict(image=_images(), label=torch.eye(3)[[0, 1, 2, 0]], cond=_images(seed=9), embedding=torch.randn([4, 8]))
    loss_lib.EDMLoss()(net, batch)
    assert set(net.kwargs) == {'class_labels', 'cond', 'embedding'}
    assert all(net.kwargs[k] is batch[v] for k, v in (('class_labels', 'label'), ('cond', 'cond'), ('embedding', 'embedding')))
    loss_lib.EDMLoss()(net, dict(image=_images()))
    assert 'embedding' not in net.kwargs # Networks without the embedding path never see the argument.
    class Projected(loss_lib.EDMLoss): # A loss that computes the embedding itself (cDDPM: an encoder of the clean slice).
        def embed(self, net, batch):
            return batch['image'].mean(dim=(2, 3))
    Projected()(net, dict(image=_images()))
    assert torch.equal(net.kwargs['embedding'], _images().mean(dim=(2, 3)))

def test_loss_parts_survive_a_snapshot(tmp_path):
    loss_fn = loss_lib.VELoss(sigma_max=50, distance='l1', mask_key='mask', target_key='image', noise='gaussian')
    persistence.save_snapshot(dict(ema=None, loss_fn=loss_fn), tmp_path / 'snap.pkl')
    loaded = persistence.load_snapshot(tmp_path / 'snap.pkl')['loss_fn']
    assert type(loaded) is loss_lib.VELoss
    assert (loaded.sigma_max, loaded.distance, loaded.mask_key, loaded.noise) == (50, 'l1', 'mask', 'gaussian')

#----------------------------------------------------------------------------
# An embedding-conditioned network (embedding_dim > 0) trains in the loop, with
# the module summary on, writes its sample grid, and samples afterwards.

NOISE_CHANNELS = 8 # model_channels * channel_mult_noise: the first inputs of map_layer0; the embedding follows.

@pytest.fixture(scope='module')
def embedding_data(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp('embedding'))
    path = launch.make_data(folder, n=16)
    images = np.load(path)['images']
    np.savez(path, images=images, embedding=np.random.default_rng(0).standard_normal([16, 8]).astype(np.float32))
    return path

def _train_embedding(run_dir, data, **overrides):
    network = dict(_target_='training.networks.EDMPrecond', model_type='SongUNet', model_channels=8, channel_mult=[1, 2],
        num_blocks=1, attn_resolutions=[], dropout=0.1, embedding_dim=8)
    kwargs = dict(run_dir=str(run_dir), dataset_kwargs=dict(_target_='embedding_dataset.EmbeddingNpzDataset', path=data),
        network_kwargs=network, loss_kwargs=dict(_target_='training.loss.EDMLoss'),
        optimizer_kwargs=dict(_target_='torch.optim.Adam', lr=1e-2), batch_size=4, total_kimg=0.016, lr_rampup_kimg=0,
        kimg_per_tick=0.008, snapshot_ticks=1, state_dump_ticks=1, grid_images=4, grid_steps=2, workers=0, print_summary=True,
        ema_halflife_kimg=0.01, seed=3)
    kwargs.update(overrides)
    training_loop.training_loop(**kwargs)
    state = sorted(glob.glob(os.path.join(str(run_dir), 'training-state-*.pt')))[-1]
    return torch.load(state, map_location='cpu', weights_only=True)

def test_embedding_network_trains_and_samples(tmp_path, embedding_data, capsys):
    state = _train_embedding(tmp_path, embedding_data)
    assert 'model.map_layer0' in capsys.readouterr().out # The module summary ran with the embedding.
    torch.manual_seed(3)
    init = misc.construct_class(dict(_target_='training.networks.EDMPrecond', model_type='SongUNet', model_channels=8, channel_mult=[1, 2],
        num_blocks=1, attn_resolutions=[], dropout=0.1, embedding_dim=8), 'net', img_resolution=16, img_channels=1, label_dim=0).state_dict()
    w, w0 = state['net']['model.map_layer0.weight'], init['model.map_layer0.weight']
    assert w.shape == (32, NOISE_CHANNELS + 8)
    assert not torch.equal(w[:, NOISE_CHANNELS:], w0[:, NOISE_CHANNELS:]) # The embedding columns were trained.
    assert all(torch.isfinite(v).all() for v in state['net'].values())
    assert glob.glob(str(tmp_path / 'samples-*.png')) # The sample grid got the dataset's embeddings.

    snapshot = sorted(glob.glob(str(tmp_path / 'network-snapshot-*.pkl')))[-1]
    net = persistence.load_snapshot(snapshot)['ema']
    latents = torch.randn([2, 1, 16, 16], generator=torch.Generator().manual_seed(0))
    emb = torch.from_numpy(np.load(embedding_data)['embedding'][:2])
    a = sampling.sample(net, latents, embedding=emb, num_steps=3)
    b = sampling.sample(net, latents, embedding=-emb, num_steps=3)
    assert a.shape == (2, 1, 16, 16) and torch.isfinite(a).all()
    assert (a - b).abs().max() > 1e-4 # The samples depend on the embedding.
    with pytest.raises(ValueError, match=re.escape('embedding: a (2, 8) tensor is required because embedding_dim=8')):
        sampling.sample(net, latents, num_steps=3)

def test_module_summary_does_not_change_the_run(tmp_path, embedding_data):
    # The summary calls the loss object (dropout, augment pipe, sigma and noise draws) on rank 0;
    # the random streams are restored, so the run is the same with and without it.
    aug = dict(_target_='training.augment.AugmentPipe', p=0.5, xflip=1, yflip=1, rotate_frac=1)
    a = _train_embedding(tmp_path / 'a', embedding_data, print_summary=True, augment_kwargs=aug, snapshot_ticks=None)
    b = _train_embedding(tmp_path / 'b', embedding_data, print_summary=False, augment_kwargs=aug, snapshot_ticks=None)
    assert a['net'].keys() == b['net'].keys() and all(torch.equal(a['net'][k], b['net'][k]) for k in a['net'])

#----------------------------------------------------------------------------

#----------------------------------------------------------------------------
# RegressionLoss: the network is called on x = 0 at its fixed sigma, so its
# output depends on the condition only; the loss is the plain squared error.

def test_regression_loss_sees_the_condition_only():
    torch.manual_seed(0)
    net = networks.EDMPrecond(img_resolution=8, img_channels=1, cond_channels=1, model_type='SongUNet', model_channels=8,
        channel_mult=[1], num_blocks=1, attn_resolutions=[])
    calls = []
    real = net.forward
    net.forward = lambda x, sigma, **kw: calls.append((x.clone(), sigma.clone())) or real(x, sigma, **kw)
    loss_fn = loss_lib.RegressionLoss(sigma=80)
    cond = torch.randn(3, 1, 8, 8)
    y1, y2 = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    l1 = loss_fn(net, dict(image=y1, cond=cond))
    l2 = loss_fn(net, dict(image=y2, cond=cond))
    pred = loss_fn.predict(net, y1, cond=cond)
    assert all(torch.equal(x, torch.zeros(3, 1, 8, 8)) and bool((s == 80).all()) for x, s in calls)
    assert torch.allclose(l1, (pred - y1) ** 2) and torch.allclose(l2, (pred - y2) ** 2)
    assert not torch.allclose(loss_fn.predict(net, y1, cond=cond + 1), pred)    # The condition matters.
    with pytest.raises(ValueError, match=re.escape("training.loss.sigma: expected a positive number, got 0")):
        loss_lib.RegressionLoss(sigma=0)
