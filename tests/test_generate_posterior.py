# medEDM: conditional generation with generate.py: S seeds per condition,
# posterior mean and std, npz / PNG / NIfTI outputs, per-seed determinism,
# volumes, and bad conditions.

import os
import subprocess

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

import generate
import launch
from torch_utils import persistence
from training import loss as loss_mod
from training import networks
from training import sampling

# A condition dataset (the PET family's kind of item: `image`, `cond`, optional
# `affine` / `header`), written next to the data so the subprocess can import it.
DATASET_SRC = '''
import numpy as np
import torch.utils.data
class CondNpz(torch.utils.data.Dataset): # A `_target_` dataset slot admits only Dataset classes.
    def __init__(self, path, with_affine=False):
        d = np.load(path)
        self.images, self.conds, self.with_affine = d['images'], d['conds'], with_affine
    def __len__(self):
        return len(self.images)
    def __getitem__(self, i):
        item = dict(image=self.images[i], cond=self.conds[i], idx=i)
        if self.with_affine:
            item['affine'] = np.diag([1.5, 1.5, 2.0, 1.0])
        return item
'''

SOLVER = ['sampling.solver=dpmpp_2m', 'sampling.num_steps=4']

#----------------------------------------------------------------------------

@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp('posterior')
    (folder / 'conddata.py').write_text(DATASET_SRC)
    rng = np.random.default_rng(0)
    for name, res in (('cond16', 16), ('cond8', 8)):
        np.savez(folder / f'{name}.npz', images=rng.uniform(-1, 1, (5, 1, res, res)).astype(np.float32),
            conds=rng.uniform(-1, 1, (5, 1, res, res)).astype(np.float32))
    torch.manual_seed(1)
    net = networks.EDMPrecond(img_resolution=16, img_channels=1, cond_channels=1, model_type='SongUNet', model_channels=16,
        channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0.0).eval().requires_grad_(False)
    # A snapshot's dataset_kwargs may name only project classes (they are untrusted data).
    dataset_kwargs = {'_target_': 'training.dataset.NpzDataset', 'path': str(folder / 'cond16.npz'), 'cond_key': 'conds'}
    persistence.save_snapshot(dict(ema=net, loss_fn=loss_mod.EDMLoss(), augment_pipe=None, dataset_kwargs=dataset_kwargs), folder / 'cond.pkl')
    persistence.save_snapshot(dict(ema=net, loss_fn=loss_mod.EDMLoss(), augment_pipe=None, dataset_kwargs={}), folder / 'cond-nods.pkl')
    return folder, net

def _generate(folder, pkl, outdir, nproc, *args):
    env = launch.env()
    env['PYTHONPATH'] += os.pathsep + str(folder)
    cmd = launch.torchrun_cmd('generate.py', nproc) + launch.TINY + [f'sampling.network_pkl={folder / pkl}', f'sampling.outdir={outdir}', *args]
    return subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=240)

#----------------------------------------------------------------------------

def test_posterior_npz_equals_separate_samples(setup):
    folder, net = setup
    out = folder / 'npz'
    proc = launch.check(_generate(folder, 'cond.pkl', out, 2, 'sampling.format=npz', 'sampling.batch=3',
        'sampling.cond_indices="1,3"', 'sampling.samples_per_cond=4', 'sampling.cond_seed=100', *SOLVER))
    assert 'batch 1/' in proc.stdout # Progress line on rank 0.
    data = np.load(out / 'images.npz')
    assert data['images'].shape == (2, 4, 1, 16, 16) and data['images'].dtype == np.float32
    assert data['indices'].tolist() == [1, 3]
    assert data['seeds'].tolist() == [[100 + i * 4 + j for j in range(4)] for i in (1, 3)] # cond_seed + i S + j.
    conds = np.load(folder / 'cond16.npz')
    assert np.array_equal(data['cond_images'], conds['conds'][[1, 3]])
    assert np.array_equal(data['reference_images'], conds['images'][[1, 3]])

    # Each sample is what one seed gives on its own (batch of one, one process) ...
    for k, i in enumerate([1, 3]):
        separate = []
        for seed in data['seeds'][k]:
            rnd = sampling.StackedRandomGenerator('cpu', [seed])
            cond = torch.as_tensor(conds['conds'][i:i + 1])
            with torch.no_grad():
                x = sampling.sample(net, rnd.randn([1, 1, 16, 16]), cond=cond, randn_like=rnd.randn_like, solver='dpmpp_2m', num_steps=4)
            separate.append(x.float().numpy()[0])
        separate = np.stack(separate)
        assert np.array_equal(data['images'][k], separate)

        # ... and mean / std are those of the S separate samples (numpy, float64, ddof=0).
        assert np.array_equal(data['mean'][k], separate.astype(np.float64).mean(axis=0).astype(np.float32))
        assert np.array_equal(data['std'][k], separate.astype(np.float64).std(axis=0).astype(np.float32))
        assert np.allclose(data['std'][k], np.std(separate, axis=0), rtol=1e-5, atol=1e-7)
        assert (data['std'][k] > 0).all()

    # Same samples with one process, another batch size, only item 3: per-seed determinism.
    out1 = folder / 'npz-1'
    launch.check(_generate(folder, 'cond.pkl', out1, 0, 'sampling.format=npz', 'sampling.batch=5', 'sampling.cond_indices=3',
        'sampling.samples_per_cond=4', 'sampling.cond_seed=100', *SOLVER))
    assert np.array_equal(np.load(out1 / 'images.npz')['images'][0], data['images'][1])

def test_posterior_nifti_and_png(setup, monkeypatch):
    folder, net = setup
    out = folder / 'nifti'
    launch.check(_generate(folder, 'cond.pkl', out, 0, 'sampling.format=nifti', 'sampling.cond_indices=4', 'sampling.samples_per_cond=3',
        "sampling.cond_dataset={_target_: conddata.CondNpz, path: cond16.npz, with_affine: true}", *SOLVER))
    assert sorted(os.listdir(out)) == ['000004-mean.nii.gz', '000004-samples.nii.gz', '000004-std.nii.gz']
    mean = nib.load(out / '000004-mean.nii.gz')
    samples = nib.load(out / '000004-samples.nii.gz')
    assert mean.shape == (16, 16) and samples.shape == (16, 16, 3)
    assert mean.get_data_dtype() == np.float32 and samples.get_data_dtype() == np.float32
    assert np.array_equal(mean.affine, np.diag([1.5, 1.5, 2.0, 1.0]))
    s = np.moveaxis(samples.get_fdata(dtype=np.float32), -1, 0)
    assert np.array_equal(mean.get_fdata(dtype=np.float32), s.astype(np.float64).mean(axis=0).astype(np.float32))

    # PNG panels (in process): cond | reference | samples | mean | std.
    monkeypatch.syspath_prepend(str(folder))
    conds = generate.load_conditions(net, _scfg(cond_dataset={'_target_': 'conddata.CondNpz', 'path': str(folder / 'cond16.npz')},
        cond_indices='0-1', samples_per_cond=3, num_steps=3), {})
    samples, seeds = generate.generate_posterior(net, conds, _scfg(samples_per_cond=3, num_steps=3), 'cpu', 0, 1)
    os.makedirs(folder / 'png')
    generate.write_posterior(str(folder / 'png'), 'png', conds, samples, seeds)
    assert sorted(os.listdir(folder / 'png')) == ['000000.png', '000001.png']
    assert Image.open(folder / 'png' / '000000.png').size == (16 * (1 + 1 + 3 + 2), 16)

#----------------------------------------------------------------------------
# Volumes, in process: a closed-form conditional "network" on [C, D, H, W] with
# data ~ N(cond, s^2), and a dataset whose items carry a NIfTI affine and header.

class VolumeNet:
    sigma_min, sigma_max, label_dim, cond_channels, img_channels = 0, float('inf'), 0, 1, 1
    img_shape = [1, 4, 6, 5]

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def __call__(self, x, sigma, class_labels=None, cond=None):
        w = 0.25 / (0.25 + sigma ** 2)
        return w * x + (1 - w) * cond

class VolumeDataset:
    def __init__(self):
        self.conds = np.random.default_rng(3).uniform(-1, 1, (3, 1, 4, 6, 5)).astype(np.float32)
        self.header = nib.Nifti1Header()
        self.header.set_data_dtype(np.int16)
        self.header.set_xyzt_units('mm', 'sec')
        self.header['descrip'] = b'low-dose PET'
        self.affine = np.array([[0, 0, 2.0, -10], [0, 1.5, 0, 5], [1.5, 0, 0, 3], [0, 0, 0, 1]])

    def __len__(self):
        return len(self.conds)

    def __getitem__(self, i):
        return dict(cond=self.conds[i], idx=i, affine=self.affine, header=self.header)

def _scfg(**kw):
    scfg = dict(preset=None, cond_dataset=None, cond_indices=None, samples_per_cond=4, cond_seed=7, batch=3, class_idx=None,
        solver='dpmpp_3m', discretization='edm', corrector='none', afs=False, sigma_c=None, warp_k=0.3, num_steps=12,
        sigma_min=0.002, sigma_max=80, rho=7, S_churn=0, S_min=0, S_max=float('inf'), S_noise=1, guidance=1, format='nifti')
    scfg.update(kw)
    return scfg

def test_posterior_volumes_nifti_keeps_affine_and_header(tmp_path, monkeypatch):
    dataset = VolumeDataset()
    monkeypatch.setattr(generate.misc, 'construct_class', lambda cfg, key: dataset)
    net = VolumeNet()
    conds = generate.load_conditions(net, _scfg(cond_dataset={'_target_': 'x'}, cond_indices='0,2'), {})
    samples, seeds = generate.generate_posterior(net, conds, _scfg(), 'cpu', 0, 1)
    assert samples.shape == (2, 4, 1, 4, 6, 5) and seeds.tolist() == [[7, 8, 9, 10], [15, 16, 17, 18]]
    samples_b, _ = generate.generate_posterior(net, conds, _scfg(batch=8), 'cpu', 0, 1)
    assert np.array_equal(samples, samples_b)

    generate.write_posterior(str(tmp_path), 'nifti', conds, samples, seeds)
    mean, std = sampling.posterior_stats(samples, axis=1)
    for suffix, ref, shape in (('mean', mean[1, 0], (4, 6, 5)), ('std', std[1, 0], (4, 6, 5)), ('samples', np.moveaxis(samples[1, :, 0], 0, -1), (4, 6, 5, 4))):
        img = nib.load(tmp_path / f'000002-{suffix}.nii.gz')
        assert img.shape == shape and img.get_data_dtype() == np.float32
        assert np.array_equal(img.get_fdata(dtype=np.float32), ref)
        assert np.allclose(img.affine, dataset.affine)
        assert img.header['descrip'] == b'low-dose PET' and img.header.get_xyzt_units() == ('mm', 'sec')
    # Data ~ N(cond, 0.5^2): the posterior is centred on the condition.
    assert abs(float((mean[1] - dataset.conds[2]).mean())) < 0.2

    generate.write_posterior(str(tmp_path), 'png', conds, samples, seeds) # Middle slice of each volume.
    assert Image.open(tmp_path / '000000.png').size == (5 * (1 + 4 + 2), 6)

def test_nifti_geometry_from_header_alone_and_checked_before_sampling(tmp_path, monkeypatch):
    dataset = VolumeDataset()
    net = VolumeNet()
    header = nib.Nifti1Header()
    header.set_sform(dataset.affine, code='scanner')
    items = {0: dict(cond=dataset.conds[0], header=header),              # Geometry in the header only.
        1: dict(cond=dataset.conds[1], nifti_path=str(tmp_path / 'missing.nii.gz')),
        2: dict(cond=dataset.conds[2], affine=np.ones(3))}
    monkeypatch.setattr(generate.misc, 'construct_class', lambda cfg, key: items)
    conds = generate.load_conditions(net, _scfg(cond_dataset={'_target_': 'x'}, cond_indices='0', format='nifti'), {})
    samples, seeds = generate.generate_posterior(net, conds, _scfg(samples_per_cond=2), 'cpu', 0, 1)
    generate.write_posterior(str(tmp_path), 'nifti', conds, samples, seeds)
    img = nib.load(tmp_path / '000000-mean.nii.gz')
    assert np.allclose(img.affine, dataset.affine) and int(img.header['sform_code']) == 1
    # A file that cannot be read, or a malformed affine: refused while the conditions are read, before any sampling.
    with pytest.raises(ValueError, match=r'sampling.cond_dataset: cannot read the NIfTI affine / header of item 1: .*missing.nii.gz'):
        generate.load_conditions(net, _scfg(cond_dataset={'_target_': 'x'}, cond_indices='0,1', format='nifti'), {})
    with pytest.raises(ValueError, match=r'of item 2: the affine must be a finite 4 x 4 matrix, got shape \(3,\)'):
        generate.load_conditions(net, _scfg(cond_dataset={'_target_': 'x'}, cond_indices='2', format='nifti'), {})
    assert generate.load_conditions(net, _scfg(cond_dataset={'_target_': 'x'}, cond_indices='1,2', format='npz'), {}) # Not read for npz.

#----------------------------------------------------------------------------

def test_bad_condition_shape_writes_nothing(setup):
    folder, _ = setup
    out = folder / 'bad'
    proc = _generate(folder, 'cond.pkl', out, 0, 'sampling.format=npz', 'sampling.cond_dataset={_target_: conddata.CondNpz, path: cond8.npz}')
    assert proc.returncode == 1
    message = 'sampling.cond_dataset: the condition of item 0 has shape (1, 8, 8), but the network expects (1, 16, 16)'
    assert f'error: {message}' in proc.stderr, proc.stderr[-2000:]
    assert not os.path.exists(out)

def test_bad_conditions(setup, monkeypatch):
    folder, net = setup
    dataset = {'_target_': 'conddata.CondNpz', 'path': str(folder / 'cond16.npz')}
    monkeypatch.syspath_prepend(str(folder))
    with pytest.raises(ValueError, match='sampling.cond_indices: index 5 out of range for a condition dataset of 5 items'):
        generate.load_conditions(net, _scfg(cond_dataset=dataset, cond_indices='2-9'), {})
    with pytest.raises(ValueError, match='sampling.cond_indices: indices repeat'):
        generate.load_conditions(net, _scfg(cond_dataset=dataset, cond_indices='1,1'), {})
    with pytest.raises(ValueError, match='sampling.cond_dataset: the network needs condition images'):
        generate.load_conditions(net, _scfg(), {'dataset_kwargs': {}})
    with pytest.raises(ValueError, match='sampling.samples_per_cond must be >= 1, got 0'):
        generate._check(dict(_scfg(samples_per_cond=0), network_pkl='x.pkl', format='npz', seeds='0-3'))
    with pytest.raises(ValueError, match=r"sampling.cond_dataset: item 0 has no \"cond\""):
        generate.load_conditions(VolumeNet(), _scfg(cond_dataset={'_target_': 'training.dataset.NpzDataset', 'path': str(folder / 'cond16.npz')}), {})

#----------------------------------------------------------------------------
