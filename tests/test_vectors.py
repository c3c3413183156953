# medEDM: vectors (N, K) in the engine: the VectorDenoiser inside EDM's
# preconditioner, per-element sigma, and toy label-space problems with a
# known answer, trained with EDMLoss in-process and sampled by the solvers.

import numpy as np
import pytest
import torch

from training import sampling
from training.loss import EDMLoss
from training.networks import EDMPrecond

pytestmark = pytest.mark.usefixtures('one_thread')

K = 4

def _net(**kwargs):
    return EDMPrecond(img_resolution=None, img_channels=K, model_type='VectorDenoiser', model_channels=64, num_blocks=2, **kwargs)

#----------------------------------------------------------------------------
# Shapes, sigma and conditions.

def test_vector_precond_shapes_and_sigma():
    torch.manual_seed(0)
    net = _net(cond_channels=6)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(0, 0.1)
    assert net.img_shape == [K] and sampling.sample_shape(net) == [K]
    x, cond = torch.randn(3, K), torch.randn(3, 6)
    for sigma in (0.5, torch.tensor([0.1, 1.0, 3.0]), torch.full([3, 1], 0.5)):
        assert net(x, sigma, cond=cond).shape == (3, K)
    torch.testing.assert_close(net(x, 0.5, cond=cond), net(x, torch.full([3, 1], 0.5), cond=cond), rtol=0, atol=0)
    sigma = torch.tensor([[0.0, 1.0, 0.0, 2.0]]).expand(3, K) # Per element, zeros give D(x) = x exactly there.
    D = net(x, sigma, cond=cond)
    assert torch.equal(D[:, [0, 2]], x[:, [0, 2]]) and not torch.allclose(D[:, [1, 3]], x[:, [1, 3]])
    assert not torch.allclose(net(x, 1.0, cond=cond), net(x, 1.0, cond=cond + 1)) # The condition matters.
    with pytest.raises(ValueError, match=r'x: expected shape \(N, 4\)'):
        net(torch.randn(3, 5), 1.0, cond=cond)
    with pytest.raises(ValueError, match=r'cond: expected shape \(3, 6, \.\.\.\)'):
        net(x, 1.0, cond=torch.randn(3, 5))
    with pytest.raises(ValueError, match='cond: a condition'):
        net(x, 1.0)
    with pytest.raises(ValueError, match="cond: expected an image"):
        _net(cond_channels=1, cond_type='image')(x, 1.0, cond=torch.randn(3, 1))

def test_vector_denoiser_with_image_condition_is_batch_independent():
    torch.manual_seed(0)
    net = _net(cond_channels=2, cond_type='image', encoder_channels=8, encoder_levels=2, label_dim=3, embedding_dim=2).eval()
    x, cond, emb = torch.randn(4, K), torch.randn(4, 2, 8, 8), torch.randn(4, 2)
    labels = torch.eye(3)[[0, 1, 2, 0]]
    full = net(x, 1.0, cond=cond, class_labels=labels, embedding=emb)
    one = torch.cat([net(x[i:i + 1], 1.0, cond=cond[i:i + 1], class_labels=labels[i:i + 1], embedding=emb[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(full, one, rtol=1e-5, atol=1e-6)

def test_no_sample_grid_for_vector_networks(tmp_path):
    from training import training_loop
    net = _net(cond_channels=K).eval()
    training_loop._save_grid(net, dict(seeds=[0, 1], cond=torch.randn(2, K)), 2, str(tmp_path / 'grid.png'))
    assert not (tmp_path / 'grid.png').exists()

#----------------------------------------------------------------------------
# Toy problems: train with EDMLoss on CPU for a few hundred steps, sample with the solvers.

def _train(net, make_batch, steps, lr=3e-3):
    loss_fn = EDMLoss()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    for _ in range(steps):
        loss = loss_fn(net, make_batch()).sum(dim=1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval().requires_grad_(False)

def _sample(net, cond, seed0=0, solver='heun', num_steps=12):
    seeds = list(range(seed0, seed0 + cond.shape[0]))
    rnd = sampling.StackedRandomGenerator('cpu', seeds)
    latents = rnd.randn([len(seeds), K])
    return sampling.sample(net, latents, cond=cond, randn_like=rnd.randn_like, solver=solver, num_steps=num_steps).float()

def test_vector_denoiser_recovers_labels_from_a_noisy_prior():
    # x = one-hot label; cond = x + N(0, 0.7^2), a noisy prior. Samples land on the one-hot
    # vertices (the data), far closer to the labels than the prior is, and are drawn from the
    # exact posterior p(y | cond) = softmax(cond / 0.7^2): a sample is right with probability
    # E[p(y_true | cond)] = 0.567 (Monte Carlo, 2e5 draws), below the argmax's 0.681.
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    def batch(n=128, generator=gen):
        y = torch.randint(K, [n], generator=generator)
        x = torch.eye(K)[y]
        return dict(image=x, cond=x + 0.7 * torch.randn(n, K, generator=generator), y=y)
    net = _train(_net(cond_channels=K), batch, steps=300)
    test = batch(512, torch.Generator().manual_seed(99))
    samples = _sample(net, test['cond'])
    x = torch.eye(K)[test['y']]
    mse_prior = (test['cond'] - x).square().sum(1).mean()
    mse_samples = (samples - x).square().sum(1).mean()
    vertex = torch.eye(K)[samples.argmax(1)]
    assert mse_samples < 0.5 * mse_prior, (mse_samples, mse_prior)
    assert (samples - vertex).square().sum(1).sqrt().median() < 0.15 # On the data's support.
    acc_prior = (test['cond'].argmax(1) == test['y']).float().mean()
    acc_samples = (samples.argmax(1) == test['y']).float().mean()
    assert abs(acc_samples - 0.567) < 0.07 and acc_prior > acc_samples, (acc_samples, acc_prior) # 3 standard errors.

def test_vector_denoiser_reads_the_label_from_an_image():
    # cond = an 8x8 image whose bright quadrant is the class, plus noise; samples recover the
    # label far better than a noisy prior (one-hot + N(0, 0.8^2)) and than chance. Also sampled with DPM-Solver++(2M).
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    def batch(n=64, generator=gen):
        y = torch.randint(K, [n], generator=generator)
        img = torch.full([n, 1, 8, 8], -1.0)
        for i, k in enumerate(y.tolist()):
            img[i, 0, 4 * (k // 2):4 * (k // 2) + 4, 4 * (k % 2):4 * (k % 2) + 4] = 1
        img = img + 0.5 * torch.randn(img.shape, generator=generator)
        return dict(image=torch.eye(K)[y], cond=img, y=y)
    net = _train(_net(cond_channels=1, cond_type='image', encoder_channels=8, encoder_levels=2), batch, steps=300)
    test = batch(128, torch.Generator().manual_seed(99))
    prior = torch.eye(K)[test['y']] + 0.8 * torch.randn(128, K, generator=torch.Generator().manual_seed(5))
    acc_prior = (prior.argmax(1) == test['y']).float().mean()
    for solver, steps in (('heun', 12), ('dpmpp_2m', 10)):
        acc = (_sample(net, test['cond'], solver=solver, num_steps=steps).argmax(1) == test['y']).float().mean()
        assert acc > 0.9 and acc > acc_prior + 0.2, (solver, acc, acc_prior)
    # Per-seed determinism: the same seeds give the same samples in other batches.
    a = _sample(net, test['cond'][:6])
    b = torch.cat([_sample(net, test['cond'][i:i + 3], seed0=i) for i in (0, 3)])
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

#----------------------------------------------------------------------------
