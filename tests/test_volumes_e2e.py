# medEDM: a volume EDM end to end with torchrun (2 gloo ranks): training with
# 3-D augmentation and volume grids, bit-exact resume, and per-seed-identical
# generation to npz and to NIfTI carrying a reference volume's affine.

import glob
import os

import nibabel as nib
import numpy as np
import pytest
import torch

import launch

LAS_PERMUTED = np.array([[-1.5, 0, 0, 10.25], [0, 0, 2.0, -3.5], [0, 1.25, 0, 7.0], [0, 0, 0, 1]]) # Flipped x, j and k swapped.

#----------------------------------------------------------------------------

@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp('vol3d')
    launch.make_volume_data(str(folder))
    nib.save(nib.Nifti1Image(np.zeros([8, 8, 8], dtype=np.float32), LAS_PERMUTED), str(folder / 'ref_las.nii.gz'))
    return folder

def _run_dir(cwd, desc):
    found = glob.glob(os.path.join(cwd, 'runs', f'*-{desc}'))
    assert len(found) == 1, found
    return found[0]

def _final_state(run_dir):
    states = sorted(glob.glob(os.path.join(run_dir, 'training-state-*.pt')))
    assert states, f'no training state in {run_dir}'
    return torch.load(states[-1], map_location='cpu', weights_only=True)

def _train(data_dir, args):
    return launch.check(launch.run_config('train.py', 'tiny3d', args, data_dir, nproc=2))

def _generate(data_dir, args, nproc):
    return launch.check(launch.run_config('generate.py', 'tiny3d', args, data_dir, nproc=nproc))

#----------------------------------------------------------------------------

def test_volume_training_resumes_bit_exactly_and_generates_per_seed(data_dir):
    # Uninterrupted vs. two slices (stop at 12 images, resume): same final weights.
    _train(data_dir, ['training.desc=full'])
    outs = [_train(data_dir, ['training.desc=sliced', 'training.slice_kimg=0.012']).stdout for _ in range(2)]
    assert 'Stopping at kimg 0.012' in outs[0] and 'Resuming from' in outs[1] and 'Exiting...' in outs[1]
    full, sliced = _final_state(_run_dir(data_dir, 'full')), _final_state(_run_dir(data_dir, 'sliced'))
    assert full['cur_nimg'] == sliced['cur_nimg'] == 24 and full['world_size'] == 2
    for key in ('net', 'ema'):
        assert full[key].keys() == sliced[key].keys()
        for name in full[key]:
            assert torch.equal(full[key][name], sliced[key][name]), f'{key}.{name} differs'
    assert full['net']['model.map_augment.weight'].shape == (8, 15) # AugmentPipe3D's labels reach the network.
    run_dir = _run_dir(data_dir, 'full')
    assert os.path.isfile(os.path.join(run_dir, 'samples-000000.png')) # Grid of mid-slices.

    # Generation: 1 process with batch 3 to npz, 2 processes with batch 2 to NIfTI with a non-RAS
    # reference affine: seed s gives the same volume both times.
    pkl = os.path.join(run_dir, 'network-snapshot-000000.pkl')
    common = [f'sampling.network_pkl={pkl}', 'sampling.seeds=0-4']
    _generate(data_dir, common + ['sampling.format=npz', 'sampling.batch=3', 'sampling.outdir=gen_npz'], nproc=0)
    _generate(data_dir, common + ['sampling.format=nifti', 'sampling.batch=2', 'sampling.outdir=gen_las',
        f'sampling.affine_from={data_dir / "ref_las.nii.gz"}'], nproc=2)
    with np.load(data_dir / 'gen_npz' / 'images.npz') as npz:
        images, seeds = npz['images'], npz['seeds']
    assert images.shape == (5, 1, 8, 8, 8) and images.dtype == np.float32 and seeds.tolist() == [0, 1, 2, 3, 4]
    assert np.isfinite(images).all() and not np.array_equal(images[0], images[1])
    for s in range(5):
        img = nib.load(str(data_dir / 'gen_las' / f'{s:06d}.nii.gz'))
        np.testing.assert_array_equal(img.affine, LAS_PERMUTED) # Exactly the reference's (float32-representable).
        assert img.shape == (8, 8, 8) and img.get_data_dtype() == np.float32
        np.testing.assert_array_equal(np.asarray(img.dataobj), images[s, 0]) # Tensor axes = NIfTI axes, same seed = same volume.

#----------------------------------------------------------------------------
