# medEDM: generate.py's checks of the sampling config (in process, no network).

import pytest

import generate

#----------------------------------------------------------------------------

def _scfg(**kw):
    scfg = dict(network_pkl='net.pkl', seeds='0-3', batch=4, format='npz', solver='heun', discretization='edm',
        num_steps=18, sigma_min=0.002, sigma_max=80, rho=7, S_churn=0, S_min=0, S_max=float('inf'), S_noise=1, guidance=1,
        samples_per_cond=8)
    scfg.update(kw)
    return scfg

@pytest.mark.parametrize('kw, message', [
    (dict(solver='rk45'), "sampling.solver: unknown solver 'rk45' (choose from heun, euler, dpmpp_2m, dpmpp_3m, dpmpp_2m_sde, gauss_2m, gauss_3m, gauss_2m_sqrt, gauss_3m_sqrt)"),
    (dict(discretization='cosine'), "sampling.discretization: unknown discretization 'cosine' (choose from edm, vp, ve, logsnr, logsnr_warped)"),
    (dict(num_steps=0), 'sampling.num_steps must be >= 1, got 0'),
    (dict(solver='dpmpp_2m', S_churn=5), "sampling.S_churn applies to the heun and euler solvers, not 'dpmpp_2m'"),
    (dict(S_churn=-1), 'sampling.S_churn must be >= 0, got -1'),
    (dict(rho=-7), 'sampling.rho must be > 0, got -7'),
    (dict(S_min=2, S_max=1), 'sampling.S_noise / sampling.S_min / sampling.S_max: need S_noise >= 0 and S_min <= S_max, got 1, 2, 1'),
    (dict(seeds='0,4294967296'), 'sampling.seeds: seeds must be in [0, 2**32), got 4294967296'),
    (dict(sigma_min=1, sigma_max=0.5), 'sampling.sigma_min / sampling.sigma_max: need 0 < sigma_min < sigma_max'),
    (dict(guidance=float('nan')), 'sampling.guidance must be a finite number'),
    (dict(samples_per_cond=0), 'sampling.samples_per_cond must be >= 1, got 0'),
    (dict(format='tiff'), "sampling.format: expected one of png, npz, nifti, got 'tiff'"),
    (dict(network_pkl=None), 'sampling.network_pkl is required'),
    (dict(solver='dpmpp_2m', corrector='unipc'), "sampling.corrector: unknown corrector 'unipc' (choose from none, unic)"),
    (dict(corrector='unic'), "sampling.corrector=unic applies to the dpmpp_2m, dpmpp_3m, gauss_2m, gauss_3m, gauss_2m_sqrt, gauss_3m_sqrt solvers, not 'heun'"),
    (dict(afs=True), "sampling.afs applies to the dpmpp_2m, dpmpp_3m, gauss_2m, gauss_3m, gauss_2m_sqrt, gauss_3m_sqrt solvers, not 'heun'"),
    (dict(solver='dpmpp_3m', afs=True, num_steps=1), 'sampling.afs needs sampling.num_steps >= 2, got 1'),
    (dict(sigma_c=0.0), "sampling.sigma_c must be a noise level > 0 or null (the network's sigma_data), got 0.0"),
    (dict(warp_k=-1.0), 'sampling.warp_k must be >= 0 (0 = uniform log-SNR steps), got -1.0'),
    (dict(sigma_c=0.3), "sampling.sigma_c applies to sampling.discretization=logsnr_warped only, not 'edm' (set sampling.sigma_c=null)"),
    (dict(discretization='logsnr', warp_k=0.0), "sampling.warp_k applies to sampling.discretization=logsnr_warped only, not 'logsnr' (leave sampling.warp_k at 0.3)"),
])
def test_bad_sampling_config(kw, message):
    with pytest.raises(ValueError) as err:
        generate._check(_scfg(**kw))
    assert str(err.value).startswith(message)

def test_good_sampling_config():
    assert generate._check(_scfg(solver='dpmpp_2m_sde', discretization='vp', guidance=0)) == [0, 1, 2, 3]
    assert generate._check(_scfg(solver='dpmpp_2m', discretization='logsnr_warped', corrector='unic', afs=True, sigma_c=None, warp_k=0)) == [0, 1, 2, 3]
    assert generate._check(_scfg(discretization='logsnr_warped', sigma_c=0.3, warp_k=0.5)) == [0, 1, 2, 3]
    assert generate._check(_scfg(discretization='edm', sigma_c=None, warp_k=0.3)) == [0, 1, 2, 3] # The defaults pass with any steps.

def test_sampler_kwargs_carry_the_new_keys():
    from training import config as config_mod
    from omegaconf import OmegaConf
    scfg = OmegaConf.to_container(OmegaConf.structured(config_mod.SamplingConfig))
    kw = generate.sampler_kwargs(scfg)
    assert {k: kw[k] for k in ('corrector', 'afs', 'sigma_c', 'warp_k')} == dict(corrector='none', afs=False, sigma_c=None, warp_k=0.3)

#----------------------------------------------------------------------------

#----------------------------------------------------------------------------
# The posterior seed scheme (generate.py's conditional mode and evaluate.py):
# sample j of item i uses cond_seed + i * samples_per_cond + j.

def test_posterior_seeds_pinned():
    from training import sampling
    assert sampling.posterior_seeds([1, 3], 4, 100).tolist() == [[104, 105, 106, 107], [112, 113, 114, 115]]
    assert sampling.posterior_seeds([0], 2).tolist() == [[0, 1]]
    assert sampling.posterior_seeds([0, 1], 2, 2 ** 32 - 4).tolist() == [[2 ** 32 - 4, 2 ** 32 - 3], [2 ** 32 - 2, 2 ** 32 - 1]]
    with pytest.raises(ValueError, match=r'^sampling.cond_seed=4294967293: the seeds cond_seed \+ item \* samples_per_cond \+ j must stay in \[0, 2\*\*32\)$'):
        sampling.posterior_seeds([0, 1], 2, 2 ** 32 - 3)

#----------------------------------------------------------------------------
# Snapshots from before PET moved into training/pet/ name training.pet_dataset:
# the loader renames it (a string table; the engine imports no family).

def test_old_pet_dataset_target_is_renamed(tmp_path):
    import torch
    from torch_utils import persistence
    from training import network_snapshot, networks
    net = networks.EDMPrecond(img_resolution=8, img_channels=1, model_type='SongUNet', model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[])
    old = dict(_target_='training.pet_dataset.PETDataset', path='pet.npz', simulate=False)
    persistence.save_snapshot(dict(ema=net, dataset_kwargs=old), tmp_path / 'old.pkl')
    loaded, data = generate.load_network(str(tmp_path / 'old.pkl'))
    assert data['dataset_kwargs'] == dict(old, _target_='training.pet.dataset.PETDataset')
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    from training.pet.dataset import PETDataset
    persistence.check_snapshot_config(data['dataset_kwargs'], torch.utils.data.Dataset, 'dataset_kwargs') # Admitted as a project class.
    assert network_snapshot.upgrade_config(dict(_target_='training.dataset.NpzDataset', path='x')) == dict(_target_='training.dataset.NpzDataset', path='x')
    assert PETDataset.__module__ == 'training.pet.dataset'

#----------------------------------------------------------------------------
# train.py checks the experiment's sampling section with the same function,
# before any run directory is made.

def test_train_refuses_bad_sampling_section(tmp_path):
    import os
    import subprocess
    import launch
    launch.make_data(tmp_path)
    proc = launch.run('train.py', ['sampling.solver=dpmpp_2m', 'sampling.S_churn=1'], tmp_path, nproc=0, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == ["error: sampling.S_churn applies to the heun and euler solvers, not 'dpmpp_2m' "
        "(use sampling.solver=dpmpp_2m_sde for a stochastic multistep sampler)"], proc.stderr[-2000:]
    assert not os.path.exists(tmp_path / 'runs')
