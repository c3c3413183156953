# medEDM: volumes (N, C, D, H, W) in the engine: preconditioner shapes and
# per-element sigma, Conv3d resampling, the 3-D U-Net, 3-D augmentation
# geometry, volume datasets (npz, NIfTI with affines) and volume grids.

import os

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from training import image_io, sampling
from training.augment import AugmentPipe3D
from training.dataset import NiftiVolumeDataset, NpzDataset
from training.layers import Conv3d
from training.networks import EDMPrecond, VPPrecond

pytestmark = pytest.mark.usefixtures('one_thread')

TINY3D = dict(model_type='DhariwalUNet3D', model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
    channels_per_head=8, dropout=0)

def _randomize_output(net):
    # Layers that end a residual branch start at zero (F = 0); give them weights so that inputs visibly matter.
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(0, 0.1)
    return net

#----------------------------------------------------------------------------
# Preconditioner on volumes.

def test_volume_precond_shapes_cond_and_sample_shape():
    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=[8, 4, 8], img_channels=2, cond_channels=1, **TINY3D)
    assert net.img_shape == [2, 8, 4, 8] and sampling.sample_shape(net) == [2, 8, 4, 8]
    x, cond = torch.randn(3, 2, 8, 4, 8), torch.randn(3, 1, 8, 4, 8)
    for sigma in (0.7, torch.tensor([0.1, 1.0, 5.0]), torch.full([3, 1, 1, 1, 1], 0.7)):
        assert net(x, sigma, cond=cond).shape == x.shape
    torch.testing.assert_close(net(x, 0.7, cond=cond), net(x, torch.full([3, 1, 1, 1, 1], 0.7), cond=cond), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r'x: expected shape \(N, 2, 8, 4, 8\)'):
        net(torch.randn(3, 2, 8, 8, 8), 0.7, cond=torch.randn(3, 1, 8, 8, 8))
    with pytest.raises(ValueError, match=r'cond: expected shape \(3, 1, 8, 4, 8\)'):
        net(x, 0.7, cond=torch.randn(3, 1, 8, 4, 4))
    with pytest.raises(ValueError, match='sigma: expected'):
        net(x, torch.ones(3, 2))

def test_volume_per_element_sigma_zero_gives_identity():
    torch.manual_seed(0)
    net = _randomize_output(EDMPrecond(img_resolution=8, img_channels=1, **TINY3D))
    x = torch.randn(2, 1, 8, 8, 8)
    box = torch.zeros(2, 1, 8, 8, 8)
    box[:, :, 2:6, 1:5, 3:7] = 1
    D = net(x, 1.5 * box)
    assert torch.equal(D[box == 0], x[box == 0]) # c_skip = 1, c_out = 0 exactly where sigma = 0.
    assert not torch.allclose(D[box == 1], x[box == 1])
    for precond in (VPPrecond,): # The other formulations broadcast alike.
        vp = precond(img_resolution=8, img_channels=1, **TINY3D)
        assert vp(x, torch.rand(2, 1, 8, 8, 8) + 0.1).shape == x.shape

def test_unet3d_labels_embedding_and_attention():
    torch.manual_seed(0)
    net = _randomize_output(EDMPrecond(img_resolution=8, img_channels=1, label_dim=3, embedding_dim=5, **TINY3D))
    names = [n for n, _ in net.model.named_modules()]
    assert 'enc.4x4x4_block0.qkv' in names and 'enc.8x8x8_block0.qkv' not in names # attn_resolutions=[4].
    x, emb = torch.randn(2, 1, 8, 8, 8), torch.randn(2, 5)
    a = net(x, 1.0, class_labels=torch.eye(3)[[0, 1]], embedding=emb)
    b = net(x, 1.0, class_labels=torch.eye(3)[[2, 2]], embedding=emb)
    c = net(x, 1.0, class_labels=torch.eye(3)[[0, 1]], embedding=emb + 1)
    assert not torch.allclose(a, b) and not torch.allclose(a, c)
    with pytest.raises(ValueError, match=r'embedding: a \(2, 5\) tensor is required'):
        net(x, 1.0, class_labels=torch.eye(3)[[0, 1]])
    with pytest.raises(ValueError, match='divisible by 2'):
        EDMPrecond(img_resolution=[8, 6, 8], img_channels=1, **dict(TINY3D, channel_mult=[1, 2, 2]))

def test_unet3d_checkpointing_gives_the_same_values_and_gradients():
    torch.manual_seed(0)
    kwargs = dict(TINY3D, dropout=0.2)
    ref = _randomize_output(EDMPrecond(img_resolution=8, img_channels=1, **kwargs)).train()
    ckpt = EDMPrecond(img_resolution=8, img_channels=1, checkpoint=True, **kwargs).train()
    ckpt.load_state_dict(ref.state_dict())
    x = torch.randn(2, 1, 8, 8, 8)
    outs = []
    for net in (ref, ckpt):
        torch.manual_seed(5) # Same dropout masks; checkpointing replays them in the backward pass.
        y = net(x, torch.tensor([0.5, 2.0]))
        y.square().sum().backward()
        outs.append((y.detach(), [p.grad.clone() for p in net.parameters()]))
    assert torch.equal(outs[0][0], outs[1][0])
    for g0, g1 in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(g0, g1, rtol=1e-5, atol=1e-7)

#----------------------------------------------------------------------------
# Conv3d: Conv2d's conventions in 3-D.

def test_conv3d_resampling_and_init():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 6, 8)
    down = Conv3d(3, 3, kernel=0, down=True)
    torch.testing.assert_close(down(x), torch.nn.functional.avg_pool3d(x, 2)) # [1,1] taps: 2x2x2 mean.
    up = Conv3d(3, 3, kernel=0, up=True)
    torch.testing.assert_close(up(x), x.repeat_interleave(2, 2).repeat_interleave(2, 3).repeat_interleave(2, 4))
    conv = Conv3d(3, 5, kernel=3, init_mode='kaiming_uniform', init_weight=1, init_bias=1)
    assert conv.weight.shape == (5, 3, 3, 3, 3)
    assert conv.weight.abs().max() <= np.sqrt(3 / (3 * 27)) and conv.bias.abs().max() <= np.sqrt(3 / (3 * 27))
    y = conv(x)
    ref = torch.nn.functional.conv3d(x, conv.weight, conv.bias, padding=1)
    torch.testing.assert_close(y, ref)
    smooth = Conv3d(1, 1, kernel=0, down=True, resample_filter=[1, 3, 3, 1])
    torch.testing.assert_close(smooth(torch.ones(1, 1, 8, 8, 8))[..., 1:-1, 1:-1, 1:-1], torch.ones(1, 1, 2, 2, 2)) # Unit DC gain.

#----------------------------------------------------------------------------
# 3-D augmentation: exact geometry.

def _centred(idx, size):
    return np.asarray(idx, dtype=np.float64) - (np.asarray(size) - 1) / 2

def test_augment3d_inverses_are_identity():
    x = torch.randn(2, 6, 6, 6)
    apply = AugmentPipe3D._apply
    for flips in ([1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]):
        assert torch.equal(apply(apply(x, flips, [0, 0, 0], [0, 0, 0]), flips, [0, 0, 0], [0, 0, 0]), x)
    for turns in ([1, 0, 0], [0, 3, 0], [0, 0, 2], [1, 2, 3]):
        y = apply(x, [0, 0, 0], turns, [0, 0, 0])
        assert not torch.equal(y, x)
        back = y
        for plane in (2, 1, 0): # Undo the turns in reverse order.
            t = [0, 0, 0]
            t[plane] = (4 - turns[plane]) % 4
            back = apply(back, [0, 0, 0], t, [0, 0, 0])
        assert torch.equal(back, x)
    assert torch.equal(apply(x, [0, 0, 0], [0, 0, 0], [1, -2, 0])[:, 1:-1, :-2], x[:, :-2, 2:]) # Shift by (+1, -2, 0).

def test_augment3d_marker_lands_where_the_labels_say():
    torch.manual_seed(0)
    size = [8, 8, 8]
    N = 64
    marker = (2, 3, 5) # At least 2 voxels from the borders: shifts by 1 never reflect it back in.
    image = torch.zeros(N, 1, *size)
    image[:, 0, marker[0], marker[1], marker[2]] = 1
    cond = torch.cat([image * 3, -image], dim=1)
    mask = image.clone()
    pipe = AugmentPipe3D(p=1, xflip=1, yflip=1, zflip=1, rotate_int=1, translate_int=1, translate_int_max=0.125)
    out, labels = pipe(dict(image=image, cond=cond, mask=mask, idx=torch.arange(N)))
    assert labels.shape == (N, 15) and torch.equal(out['idx'], torch.arange(N))
    assert (labels[:, :3] != 0).any() and (labels[:, 3:12] != 0).any() and (labels[:, 12:] != 0).any()
    p = _centred(marker, size)
    for i in range(N):
        flips = labels[i, :3].numpy()[::-1] # x, y, z -> z, y, x (tensor axes D, H, W).
        R = labels[i, 3:12].reshape(3, 3).numpy() + np.eye(3)
        assert np.allclose(np.abs(R).sum(0), 1) and np.allclose(np.abs(R).sum(1), 1) and np.isclose(np.linalg.det(R), 1)
        t = labels[i, 12:].numpy()[::-1] * np.array(size) # Voxels along D, H, W.
        q = R @ (np.where(flips > 0, -1, 1) * p) + t
        idx = np.round(q + (np.array(size) - 1) / 2).astype(int)
        where = torch.nonzero(out['image'][i, 0]).tolist()
        assert where == [idx.tolist()], (i, labels[i])
        assert torch.equal(out['cond'][i], torch.cat([out['image'][i] * 3, -out['image'][i]])) # Moved together.
        assert torch.equal(out['mask'][i], out['image'][i])

def test_augment3d_non_cubic_and_identity():
    torch.manual_seed(0)
    x = torch.randn(16, 1, 4, 6, 6)
    pipe = AugmentPipe3D(p=1, rotate_int=1)
    out, labels = pipe(dict(image=x))
    assert out['image'].shape == x.shape
    R = labels[:, 3:12].reshape(-1, 3, 3) + torch.eye(3)
    assert torch.equal(R[:, 0].abs(), torch.tensor([1.0, 0, 0]).expand(16, 3)) # D (size 4) never swaps with H or W.
    assert torch.equal(torch.sort(out['image'].flatten(1), dim=1).values, torch.sort(x.flatten(1), dim=1).values) # Permutations.
    same, labels = AugmentPipe3D(p=0, xflip=1)(dict(image=x))
    assert torch.equal(same['image'], x) and torch.equal(labels, torch.zeros(16, 15))
    with pytest.raises(ValueError, match=r'\(N, C, D, H, W\)'):
        pipe(dict(image=torch.zeros(2, 1, 4, 4)))
    with pytest.raises(ValueError, match='mask'):
        pipe(dict(image=x, mask=torch.zeros(16, 1, 4, 6, 5)))

#----------------------------------------------------------------------------
# Datasets of volumes.

def test_npz_dataset_volumes_with_cond_and_mask(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, [5, 1, 4, 6, 8]).astype(np.float32)
    cond = rng.uniform(-1, 1, [5, 2, 4, 6, 8]).astype(np.float32)
    mask = (rng.uniform(size=[5, 4, 6, 8]) > 0.5).astype(np.uint8)
    np.savez(tmp_path / 'v.npz', images=images, cond=cond, mask=mask)
    ds = NpzDataset(tmp_path / 'v.npz', cond_key='cond', mask_key='mask')
    item = ds[3]
    assert np.array_equal(item['image'], images[3]) and np.array_equal(item['cond'], cond[3]) and np.array_equal(item['mask'], mask[3][None])
    assert ds.image_shape == [1, 4, 6, 8] and ds.resolution == [4, 6, 8] and ds.num_channels == 1 and ds.cond_channels == 2
    np.savez(tmp_path / 'c.npz', images=images[:, :, :4, :4, :4])
    assert NpzDataset(tmp_path / 'c.npz').resolution == 4
    np.savez(tmp_path / 'bad.npz', images=images, mask=mask * 2)
    with pytest.raises(ValueError, match='training.dataset.mask_key'):
        NpzDataset(tmp_path / 'bad.npz', mask_key='mask')

LAS = np.array([[-1.5, 0, 0, 10.25], [0, 0, 2.0, -3.5], [0, 1.25, 0, 7.0], [0, 0, 0, 1]]) # Non-RAS (flipped, permuted axes).

def test_nifti_volume_dataset_crop_pad_affine_and_collate(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(2):
        data = rng.uniform(0, 100, [10, 8, 6]).astype(np.float32)
        data[5, 3, 2] = 1000 # Marker (world position checked below).
        nib.save(nib.Nifti1Image(data, LAS), tmp_path / f'img{i}.nii.gz')
        nib.save(nib.Nifti1Image(data * 2, LAS), tmp_path / f'cond{i}.nii.gz')
        nib.save(nib.Nifti1Image((data > 50).astype(np.uint8), LAS), tmp_path / f'mask{i}.nii.gz')
    files = lambda name: [str(tmp_path / f'{name}{i}.nii.gz') for i in range(2)]
    ds = NiftiVolumeDataset(files('img'), cond_path=files('cond'), mask_path=files('mask'), shape=[8, 8, 8],
        intensity=dict(mode='fixed', low=0, high=1000))
    assert len(ds) == 2 and ds.image_shape == [1, 8, 8, 8] and ds.resolution == 8 and ds.cond_channels == 1
    item = ds[1]
    assert item['image'].shape == (1, 8, 8, 8) and item['cond'].shape == (1, 8, 8, 8) and item['mask'].shape == (1, 8, 8, 8)
    # Crop 10 -> 8 along i (offset 1), pad 6 -> 8 along k (offset -1): the marker moves to (4, 3, 3) ...
    assert item['image'][0, 4, 3, 3] == 1 and item['image'].max() == 1
    assert np.all(item['image'][0, :, :, 0] == -1) and np.all(item['image'][0, :, :, 7] == -1) # Padding (0) normalised.
    # ... and keeps its world position.
    assert item['affine'].dtype == np.float64
    np.testing.assert_array_equal(item['affine'] @ [4, 3, 3, 1], LAS @ [5, 3, 2, 1])
    assert set(np.unique(item['mask'])) <= {0, 1}
    batch = torch.utils.data.default_collate([ds[0], ds[1]])
    assert batch['affine'].dtype == torch.float64 and batch['affine'].shape == (2, 4, 4)
    assert torch.equal(batch['affine'][1], torch.from_numpy(item['affine']))
    folder = NiftiVolumeDataset(str(tmp_path), shape=[8, 8, 8]) # A folder: every NIfTI file in it.
    assert len(folder) == 6
    with pytest.raises(ValueError, match='training.dataset.mask_path: 1 files for 2 images'):
        NiftiVolumeDataset(files('img'), mask_path=files('mask')[:1])
    with pytest.raises(ValueError, match=r'training.dataset.shape must be \[D, H, W\]'):
        NiftiVolumeDataset(files('img'), shape=[8, 8])

#----------------------------------------------------------------------------
# generate.py's per-seed NIfTI output (in-process; tests/test_volumes_e2e.py runs it with torchrun).

def _scfg(**kwargs):
    scfg = dict(preset=None, batch=2, format='nifti', subdirs=False, class_idx=None, affine_from=None, solver='euler', discretization='edm',
        corrector='none', afs=False, sigma_c=None, warp_k=0.3, num_steps=2, sigma_min=0.002, sigma_max=80, rho=7,
        S_churn=0, S_min=0, S_max=float('inf'), S_noise=1, guidance=1)
    return dict(scfg, **kwargs)

def test_generate_nifti_carries_the_reference_affine(tmp_path):
    import generate
    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=[8, 4, 8], img_channels=1, **TINY3D).eval().requires_grad_(False) # As load_network returns it.
    ras = np.array([[1.0, 0, 0, -4.0], [0, 1.0, 0, -2.0], [0, 0, 1.0, 2.5], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(np.zeros([8, 4, 8], dtype=np.float32), ras), tmp_path / 'ref.nii.gz')
    for name in 'abcd': # generate.run makes the output folder.
        os.makedirs(tmp_path / name)
    generate.run_unconditional(net, _scfg(affine_from=str(tmp_path / 'ref.nii.gz')), [3, 7], str(tmp_path / 'a'), 'cpu', 0, 1)
    generate.run_unconditional(net, _scfg(format='npz', batch=1), [3, 7], str(tmp_path / 'b'), 'cpu', 0, 1)
    images = np.load(tmp_path / 'b' / 'images.npz')['images']
    for k, seed in enumerate((3, 7)):
        img = nib.load(tmp_path / 'a' / f'{seed:06d}.nii.gz')
        np.testing.assert_array_equal(img.affine, ras)
        np.testing.assert_array_equal(np.asarray(img.dataobj), images[k, 0])
    generate.run_unconditional(net, _scfg(), [3], str(tmp_path / 'c'), 'cpu', 0, 1)
    np.testing.assert_array_equal(nib.load(tmp_path / 'c' / '000003.nii.gz').affine, np.eye(4)) # No reference: identity.
    with pytest.raises(ValueError, match='sampling.affine_from: cannot read the NIfTI affine / header of .*missing.nii.gz'):
        generate.run_unconditional(net, _scfg(affine_from=str(tmp_path / 'missing.nii.gz')), [3], str(tmp_path / 'd'), 'cpu', 0, 1)
    assert not os.listdir(tmp_path / 'd') # Read before sampling: nothing written.

def test_nifti_volumes_train_in_the_loop_and_condition_generation(tmp_path, monkeypatch):
    # Conditional volume EDM on NIfTI files (non-RAS, cropped and padded), 3-D augmentation, in one
    # process: the items' affines travel beside the tensors through the loop, and conditional NIfTI
    # output carries the affine of its condition item (the file's, moved to the crop).
    import generate
    from training import training_loop
    rng = np.random.default_rng(0)
    for name in ('img', 'cond'):
        os.makedirs(tmp_path / name)
        for i in range(3):
            nib.save(nib.Nifti1Image(rng.uniform(0, 100, [10, 8, 6]).astype(np.float32), LAS), tmp_path / name / f'{i}.nii.gz')
    monkeypatch.chdir(tmp_path)
    dataset_kwargs = dict(_target_='training.dataset.NiftiVolumeDataset', path='img', cond_path='cond', shape=[8, 8, 8],
        intensity=dict(mode='percentile'))
    training_loop.training_loop(run_dir='run', dataset_kwargs=dataset_kwargs,
        network_kwargs=dict(_target_='training.networks.EDMPrecond', **TINY3D), loss_kwargs=dict(_target_='training.loss.EDMLoss'),
        augment_kwargs=dict(_target_='training.augment.AugmentPipe3D', xflip=1, rotate_int=1, translate_int=1),
        optimizer_kwargs=dict(_target_='torch.optim.Adam', lr=1e-3), batch_size=2, total_kimg=0.004, kimg_per_tick=0.002,
        snapshot_ticks=1, state_dump_ticks=1, grid_images=2, grid_steps=2, workers=0, print_summary=False)
    assert Image.open(tmp_path / 'run' / 'samples-000000.png').size == (2 * 24, 8) # Two volumes' mid-slices.
    net, snapshot = generate.load_network(str(tmp_path / 'run' / 'network-snapshot-000000.pkl'))
    assert net.cond_channels == 1 and sampling.sample_shape(net) == [1, 8, 8, 8]
    scfg = _scfg(cond_dataset=None, cond_indices=[2], samples_per_cond=2, cond_seed=0)
    conds = generate.load_conditions(net, scfg, snapshot)
    samples, seeds = generate.generate_posterior(net, conds, scfg, 'cpu', 0, 1)
    os.makedirs('out')
    generate.write_posterior('out', 'nifti', conds, samples, seeds)
    expected = LAS @ np.array([[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, -1], [0, 0, 0, 1]]) # Crop 10 -> 8 along i (offset 1), pad 6 -> 8 along k (offset -1).
    for what in ('mean', 'std', 'samples'):
        img = nib.load(tmp_path / 'out' / f'000002-{what}.nii.gz')
        np.testing.assert_array_equal(img.affine, expected)
    assert nib.load(tmp_path / 'out' / '000002-samples.nii.gz').shape == (8, 8, 8, 2)

#----------------------------------------------------------------------------
# Grids of volumes: the mid-slices of the three planes.

def test_volume_grid_shows_three_mid_slices(tmp_path):
    v = -np.ones([2, 1, 4, 6, 8], dtype=np.float32)
    v[0, 0, 2, :, :] = 1 # The axial mid-slice (D // 2) of volume 0 is white.
    v[1, 0, :, :, 4] = 1 # The sagittal mid-slice (W // 2) of volume 1 is white.
    image_io.save_image_grid(v, tmp_path / 'g.png', grid_size=(2, 1))
    g = np.asarray(Image.open(tmp_path / 'g.png'))
    assert g.shape == (8, 48) # Tiles of S = 8: three planes of 8 x 8, two volumes.
    assert np.all(g[:6, :8] == 255) and np.all(g[6:, :8] == 0) # Axial: H x W = 6 x 8.
    assert np.all(g[2, 8:16] == 255) and g[:, 8:16].astype(int).sum() == 8 * 255 # Coronal (D x W): the row D // 2 only.
    assert np.all(g[:4, 40:46] == 255) and np.all(g[4:, 40:48] == 0) and np.all(g[:, 46:48] == 0) # Volume 1, sagittal (D x H).
    assert np.all(g[:6, 28] == 255) and g[:, 24:32].astype(int).sum() == 6 * 255 # Volume 1, axial: the column W // 2.

#----------------------------------------------------------------------------

def test_bad_img_resolution_names_the_key():
    for bad, model in ((None, {}), ([8, 8], TINY3D), ([8, 0, 8], TINY3D), (True, TINY3D)):
        with pytest.raises(ValueError, match='img_resolution: expected a positive int or'):
            EDMPrecond(img_resolution=bad, img_channels=1, **(model or dict(model_type='DhariwalUNet', model_channels=8,
                channel_mult=[1], num_blocks=1, attn_resolutions=[])))

#----------------------------------------------------------------------------
