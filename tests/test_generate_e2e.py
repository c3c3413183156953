# medEDM: generate.py end to end: per-seed determinism across batch sizes and
# process counts, output formats, refused snapshots, bad input.

import os
import pickle
import re

import numpy as np
import pytest
import torch
from PIL import Image

import launch
from torch_utils import persistence
from training import loss as loss_mod
from training import networks
from training import sampling

#----------------------------------------------------------------------------

@pytest.fixture(scope='module')
def snapshots(tmp_path_factory):
    folder = tmp_path_factory.mktemp('gen')
    torch.manual_seed(1)
    kwargs = dict(img_resolution=16, model_type='SongUNet', model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0.0)
    uncond = networks.EDMPrecond(img_channels=1, **kwargs).eval().requires_grad_(False)
    cond = networks.EDMPrecond(img_channels=2, label_dim=3, label_dropout=0.1, **kwargs).eval().requires_grad_(False)
    paths = {}
    for name, net in (('uncond', uncond), ('labels', cond)):
        paths[name] = str(folder / f'{name}.pkl')
        persistence.save_snapshot(dict(ema=net, loss_fn=loss_mod.EDMLoss(), augment_pipe=None, dataset_kwargs={}), paths[name])
    evil = folder / 'evil.pkl'
    class Evil:
        def __reduce__(self):
            return (os.system, (f'touch {folder}/pwned',))
    evil.write_bytes(pickle.dumps(dict(ema=Evil())))
    paths['evil'] = str(evil)
    return folder, paths

def _generate(folder, pkl, outdir, nproc, *args):
    return launch.run('generate.py', [f'sampling.network_pkl={pkl}', f'sampling.outdir={outdir}', *args], folder, nproc=nproc)

#----------------------------------------------------------------------------

def test_per_seed_identical_across_batch_sizes_and_processes(snapshots):
    folder, paths = snapshots
    results = []
    for nproc, batch in ((0, 7), (0, 3), (2, 2)):
        out = folder / f'npz-{nproc}-{batch}'
        launch.check(_generate(folder, paths['uncond'], out, nproc, 'sampling.seeds=0-6', f'sampling.batch={batch}', 'sampling.format=npz'))
        data = np.load(out / 'images.npz')
        assert data['images'].shape == (7, 1, 16, 16) and data['images'].dtype == np.float32
        assert data['seeds'].tolist() == list(range(7))
        results.append(data['images'])
    assert np.array_equal(results[0], results[1])
    assert np.array_equal(results[0], results[2])
    # A seed's sample does not depend on which other seeds are generated.
    out = folder / 'npz-subset'
    launch.check(_generate(folder, paths['uncond'], out, 0, 'sampling.seeds="5,2"', 'sampling.format=npz'))
    sub = np.load(out / 'images.npz')
    assert sub['seeds'].tolist() == [5, 2]
    assert np.array_equal(sub['images'], results[0][[5, 2]])

def test_png_output_and_stochastic_sampler(snapshots):
    folder, paths = snapshots
    pngs = []
    for nproc, batch in ((0, 4), (2, 1)):
        out = folder / f'png-{nproc}'
        launch.check(_generate(folder, paths['uncond'], out, nproc, 'sampling.seeds=0-4', f'sampling.batch={batch}',
            'sampling.S_churn=5', 'sampling.subdirs=true'))
        files = sorted(os.listdir(out / '000000'))
        assert files == [f'{s:06d}.png' for s in range(5)]
        pngs.append([np.asarray(Image.open(out / '000000' / f)) for f in files])
    assert pngs[0][0].shape == (16, 16)
    assert all(np.array_equal(a, b) for a, b in zip(*pngs))

def test_class_conditional_two_channels(snapshots):
    folder, paths = snapshots
    out = folder / 'labels'
    launch.check(_generate(folder, paths['labels'], out, 0, 'sampling.seeds=0-3', 'sampling.class_idx=2', 'sampling.format=npz'))
    assert np.load(out / 'images.npz')['images'].shape == (4, 2, 16, 16)

def test_multistep_solver_and_guidance_per_seed(snapshots):
    # DPM-Solver++(3M) with guidance and logSNR steps, batches of 3 + 1, equals the
    # samples computed here in one batch of 4 from the same snapshot.
    folder, paths = snapshots
    out = folder / 'guided'
    launch.check(_generate(folder, paths['labels'], out, 0, 'sampling.batch=3', 'sampling.seeds=0-3', 'sampling.format=npz',
        'sampling.solver=dpmpp_3m', 'sampling.discretization=logsnr', 'sampling.num_steps=6', 'sampling.guidance=2.5'))
    images = np.load(out / 'images.npz')['images']
    net = sampling.PerSampleNet(persistence.load_snapshot(paths['labels'])['ema'])
    rnd = sampling.StackedRandomGenerator('cpu', range(4))
    latents = rnd.randn([4, 2, 16, 16])
    labels = torch.eye(3)[rnd.randint(3, size=[4])]
    with torch.no_grad():
        ref = sampling.sample(net, latents, class_labels=labels, randn_like=rnd.randn_like, solver='dpmpp_3m',
            discretization='logsnr', num_steps=6, guidance=2.5)
    assert np.array_equal(images, ref.float().numpy())

#----------------------------------------------------------------------------

@pytest.mark.parametrize('args, message', [
    (['sampling.seeds=5-3'], "sampling.seeds: bad range '5-3': start 5 is greater than end 3"),
    (['sampling.seeds=a-b'], "sampling.seeds: bad range 'a-b'"),
    (['sampling.solver=rk45'], "sampling.solver: unknown solver 'rk45'"),
    (['sampling.num_steps=0'], 'sampling.num_steps must be >= 1, got 0'),
    (['sampling.format=tiff'], "sampling.format: expected one of png, npz, nifti, got 'tiff'"),
    (['sampling.class_idx=1'], 'sampling.class_idx=1: the network has 0 classes'),
    (['sampling.guidance=2'], 'sampling.guidance=2: classifier-free guidance needs a class-conditional network'),
    (['sampling.rho=0'], 'sampling.rho must be > 0, got 0'),
    (['sampling.seeds=[0,4294967296]'], 'sampling.seeds: seeds must be in [0, 2**32), got 4294967296'),
    (['sampling.seeds=[-1,3]'], 'sampling.seeds: seeds must be in [0, 2**32), got -1'),
])
def test_bad_sampling_input(snapshots, args, message):
    folder, paths = snapshots
    out = folder / 'bad'
    proc = _generate(folder, paths['uncond'], out, 0, *args)
    assert proc.returncode == 1
    assert f'error: {message}' in proc.stderr, proc.stderr[-2000:]
    assert not os.path.exists(out)

@pytest.mark.parametrize('nproc', [0, 2])
def test_unwritable_outdir_fails_before_sampling(snapshots, nproc):
    # An output "folder" that is a file, or lies below one: one clear line from every rank, no traceback.
    folder, paths = snapshots
    blocker = folder / 'a-file'
    blocker.write_text('x')
    for outdir in (blocker, blocker / 'sub'):
        proc = _generate(folder, paths['uncond'], outdir, nproc, 'sampling.seeds=0-3')
        assert proc.returncode == 1 and f'error: sampling.outdir: cannot write to {outdir}' in proc.stderr, proc.stderr[-2000:]
        assert not re.search(r'File ".*generate\.py", line|File ".*/(training|torch_utils)/', proc.stderr), proc.stderr[-2000:] # torchrun's own summary only.
        assert 'Generating' not in proc.stdout
        if nproc == 2:
            assert proc.stderr.count('error: sampling.outdir') == 2

def test_missing_snapshot_argument(snapshots):
    folder, _ = snapshots
    proc = launch.run('generate.py', [], folder, nproc=0)
    assert proc.returncode == 1
    assert 'error: sampling.network_pkl is required' in proc.stderr

def test_snapshot_naming_os_system_is_refused(snapshots):
    folder, paths = snapshots
    proc = _generate(folder, paths['evil'], folder / 'evil-out', 2)
    assert proc.returncode != 0
    assert 'refusing to load global posix.system' in proc.stderr or 'refusing to load global os.system' in proc.stderr
    assert not (folder / 'pwned').exists()

#----------------------------------------------------------------------------
