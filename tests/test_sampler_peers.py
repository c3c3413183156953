# medEDM: bench/sampler_peers.py's harness: a snapshot's network setting (a
# conditional network with its cond from the snapshot's dataset), the counted
# evaluations, and -- where the bench-only peers are installed (make
# bench-peers) -- that the wrappers run the peers on our denoiser correctly.

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import launch
from torch_utils import persistence
from training import loss as loss_mod
from training import networks
from training import sampling

sys.path.insert(0, os.path.join(launch.ROOT, 'bench'))
import sampler_peers as peers # pylint: disable=wrong-import-position

#----------------------------------------------------------------------------
# A tiny conditional network (the PET kind: image + condition image), trained
# a few steps on "image = smoothed condition", saved as a snapshot whose
# dataset_kwargs name the condition data.

@pytest.fixture(scope='module')
def cond_snapshot(tmp_path_factory):
    folder = tmp_path_factory.mktemp('peers')
    rng = np.random.default_rng(0)
    conds = rng.uniform(-1, 1, (32, 1, 8, 8)).astype(np.float32)
    images = (conds + np.roll(conds, 1, axis=-1)) / 2
    np.savez(folder / 'cond8.npz', images=images, conds=conds)
    torch.manual_seed(0)
    net = networks.EDMPrecond(img_resolution=8, img_channels=1, cond_channels=1, model_type='SongUNet', model_channels=8,
        channel_mult=[1], num_blocks=1, attn_resolutions=[], dropout=0.0)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    loss_fn = loss_mod.EDMLoss()
    for step in range(20):
        idx = torch.as_tensor(rng.integers(32, size=8))
        loss = loss_fn(net, {'image': torch.as_tensor(images)[idx], 'cond': torch.as_tensor(conds)[idx]}).sum() / 8
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.eval().requires_grad_(False)
    dataset_kwargs = {'_target_': 'training.dataset.NpzDataset', 'path': str(folder / 'cond8.npz'), 'cond_key': 'conds'}
    persistence.save_snapshot(dict(ema=net, loss_fn=loss_fn, augment_pipe=None, dataset_kwargs=dataset_kwargs), folder / 'cond.pkl')
    return folder, net, conds

def test_snapshot_setting_takes_cond_from_the_dataset(cond_snapshot):
    folder, net, conds = cond_snapshot
    loaded, denoise, latents = peers.snapshot_setting(str(folder / 'cond.pkl'), 3, torch.Generator().manual_seed(1))
    assert latents.shape == (3, 1, 8, 8) and latents.dtype == torch.float64
    x, sigma = latents * 2, torch.tensor(2.0, dtype=torch.float64)
    ref = net(x.float(), sigma.float(), cond=torch.as_tensor(conds[:3])).double()
    assert torch.allclose(denoise(x, sigma), ref, atol=1e-6) # Items 0..2 are the conditions of latents 0..2.
    # Our preset on it through the bench's counter: NFE = the ladder's, error falls with NFE.
    fn = peers.our_runner(dict(preset='fast'))
    ladder = lambda nfe: peers.our_ladder(fn.options, nfe, 0.002, 80, 0.5)
    with torch.no_grad():
        reference = sampling.sample(loaded, latents, cond=torch.as_tensor(conds[:3]), solver='dpmpp_3m', num_steps=100)
    errors = peers.measure(fn, ladder, denoise, latents, reference, [4, 8, 16])
    assert errors[16] < errors[4] and errors[16] < 0.05, errors
    with torch.no_grad():
        x = sampling.sample(loaded, latents, cond=torch.as_tensor(conds[:3]), preset='fast', num_steps=9)
    assert peers.acc.rel_error(x, reference) == pytest.approx(errors[8], rel=1e-6) # The bench's preset row is sample(preset=...).

@pytest.mark.slow # About 40 s with the peers installed (their Gaussian check); the fast variant is the test above.
def test_bench_runs_on_a_snapshot(cond_snapshot):
    # The command line with --network PATH on the network setting alone (peers given as none installed: the
    # bench needs them and says how to get them).
    folder, _, _ = cond_snapshot
    cmd = [sys.executable, os.path.join(launch.ROOT, 'bench', 'sampler_peers.py'), '--network', str(folder / 'cond.pkl'), '--batch', '2',
        '--settings', 'network', '--peers-dir', str(folder / 'none')]
    proc = subprocess.run(cmd, cwd=launch.ROOT, env=dict(launch.env(), PYTHONPATH=''), capture_output=True, text=True, timeout=120)
    if 'make bench-peers' in proc.stderr: # No peers on this machine: the message says how to install them.
        assert proc.returncode != 0
        return
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '== network' in proc.stdout and 'NFE to match Heun@35' in proc.stdout

#----------------------------------------------------------------------------
# With the peers installed: the wrappers are right (k-diffusion's DPM-Solver++(2M)
# is the algorithm of our dpmpp_2m, bit for bit up to rounding; diffusers' in
# float32), every peer passes the Gaussian check, and a broken one fails it.

PEERS_DIR = os.path.join(launch.ROOT, '.peers')

@pytest.fixture(scope='module')
def loaded_peers():
    if not os.path.isdir(os.path.join(PEERS_DIR, 'diffusers')):
        pytest.skip('bench-only peers not installed (make bench-peers)')
    return peers.load_peers(PEERS_DIR)

def _gauss(x, sigma):
    return 0.25 / (0.25 + sigma ** 2) * x

PEER_WARNINGS = pytest.mark.filterwarnings('ignore:__array_wrap__ must accept context:DeprecationWarning') # diffusers' DEIS under numpy 2.

@PEER_WARNINGS
def test_peer_wrappers_match_our_dpmpp_2m(loaded_peers):
    from training import solvers # pylint: disable=import-outside-toplevel
    diffusers, kdiff = loaded_peers
    den = lambda x, sigma: 0.3 + 0.7 * torch.tanh(x / (1 + sigma))
    latents = torch.randn(8, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sigmas = sampling.sigma_steps(10, 0.002, 80, 'edm')
    ours = solvers.solve(den, latents * 80, sigmas, 'dpmpp_2m')
    k = peers.kdiff_runner(kdiff, 'sample_dpmpp_2m')(den, latents, sigmas)
    d = peers.diffusers_runner(diffusers, 'DPMSolverMultistepScheduler', algorithm_type='dpmsolver++', solver_order=2)(den, latents, sigmas)
    e = peers.diffusers_runner(diffusers, 'EDMDPMSolverMultistepScheduler', edm=True, solver_order=2)(den, latents, sigmas)
    assert torch.allclose(k, ours, rtol=1e-12, atol=1e-12)
    assert torch.allclose(d, ours, rtol=1e-4, atol=1e-4) and torch.allclose(e, ours, rtol=1e-4, atol=1e-4)

@PEER_WARNINGS
def test_peer_check_passes_peers_and_fails_a_broken_one(loaded_peers):
    diffusers, kdiff = loaded_peers
    rows = {(label, disc): (fn, per) for label, fn, per, disc in peers.peer_rows(diffusers, kdiff)}
    for key in [('kdiff heun', 'edm'), ('diffusers deis o3 +D', 'edm'), ('diffusers unipc bh2 o3', 'logsnr')]:
        ok, errors = peers.check_peer(rows[key][0], rows[key][1], key[1], order1=False)
        assert ok, (key, errors)
    assert not peers.check_peer(rows[('diffusers deis o3', 'edm')][0], 1, 'edm', order1=False)[0] # NaN on its step into 0.
    biased = lambda denoise, latents, sigmas: rows[('kdiff heun', 'edm')][0](lambda x, s: 1.05 * denoise(x, s), latents, sigmas)
    assert not peers.check_peer(biased, 2, 'edm', order1=False)[0] # Converges, but not to the exact answer.

#----------------------------------------------------------------------------

def test_bench_ladder_is_the_ladder_sample_uses_at_any_sigma_data():
    # The preset's levels are multiples of sigma_data with EDM's 0.002 as their floor, the bench's floor too: the
    # bench's preset row runs the noise levels sample() runs, also below sigma_data = 0.143 (PET's 0.1).
    fn = peers.our_runner(dict(preset='fast'))
    for sd in (0.1, 0.5, 1.0):
        for nfe in (6, 8, 12):
            o = sampling.resolve_levels(sampling.check_sampler_options(dict(preset='fast', num_steps=nfe + 1)), sd)
            ref = sampling.sigma_steps(nfe + 1, o['sigma_min'], 80, 'logsnr_warped', sigma_c=o['sigma_c'], warp_k=0.5)
            assert torch.equal(peers.our_ladder(fn.options, nfe, 0.002, 80, sd), ref), (sd, nfe)
    assert o['sigma_min'] == 0.014 and sampling.resolve_levels(o | dict(sigma_min=None, sigma_c=None), 0.1)['sigma_min'] == 0.002
