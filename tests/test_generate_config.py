# medEDM: generate.py's checks of the sampling config (in process, no network).

import pytest

import generate

#----------------------------------------------------------------------------

def _scfg(**kw):
    scfg = dict(network_pkl='net.pkl', seeds='0-3', batch=4, format='npz', solver='heun', discretization='edm',
        num_steps=18, sigma_min=0.002, sigma_max=80, S_churn=0, guidance=1, samples_per_cond=8)
    scfg.update(kw)
    return scfg

@pytest.mark.parametrize('kw, message', [
    (dict(solver='rk45'), "sampling.solver: unknown solver 'rk45' (choose from heun, euler, dpmpp_2m, dpmpp_3m, dpmpp_2m_sde)"),
    (dict(discretization='cosine'), "sampling.discretization: unknown discretization 'cosine' (choose from edm, vp, ve, logsnr)"),
    (dict(num_steps=0), 'sampling.num_steps must be >= 1, got 0'),
    (dict(solver='dpmpp_2m', S_churn=5), "sampling.S_churn applies to the heun and euler solvers, not 'dpmpp_2m'"),
    (dict(S_churn=-1), 'sampling.S_churn must be >= 0, got -1'),
    (dict(sigma_min=1, sigma_max=0.5), 'sampling.sigma_min / sigma_max: need 0 < sigma_min < sigma_max'),
    (dict(guidance=float('nan')), 'sampling.guidance must be a finite number'),
    (dict(samples_per_cond=0), 'sampling.samples_per_cond must be >= 1, got 0'),
    (dict(format='tiff'), "sampling.format: expected one of png, npz, nifti, got 'tiff'"),
    (dict(network_pkl=None), 'sampling.network_pkl is required'),
])
def test_bad_sampling_config(kw, message):
    with pytest.raises(ValueError) as err:
        generate._check(_scfg(**kw))
    assert str(err.value).startswith(message)

def test_good_sampling_config():
    assert generate._check(_scfg(solver='dpmpp_2m_sde', discretization='vp', guidance=0)) == [0, 1, 2, 3]

#----------------------------------------------------------------------------
