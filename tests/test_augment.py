# medEDM: tests of training/augment.py.

import io
import pickle

import pytest
import torch

from torch_utils import persistence
from training.augment import AUGMENT_LABEL_NAMES, AugmentPipe

EDM_KWARGS = dict(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)

#----------------------------------------------------------------------------
# Smooth random test images (so bilinear resampling is well behaved).

def smooth_images(N, C, R=16, seed=0, base=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn([N, C, base, base], generator=g)
    return torch.nn.functional.interpolate(x, size=(R, R), mode='bilinear', align_corners=False)

#----------------------------------------------------------------------------

def test_p0_identity_bit_exact():
    images = smooth_images(6, 3)
    batch = dict(image=images, cond=images * 2, mask=(images > 0).float(), label=torch.ones(6, 4), idx=torch.arange(6))
    pipe = AugmentPipe(p=0, **EDM_KWARGS, rotate_int=1, translate_int=1)
    state = torch.get_rng_state()
    out, labels = pipe(batch)
    assert torch.equal(torch.get_rng_state(), state) # Nothing drawn.
    assert out is not batch and set(out) == set(batch)
    for key in batch:
        assert torch.equal(out[key], batch[key])
    assert labels.shape == (6, 9) and labels.dtype == torch.float32 and (labels == 0).all()

def test_label_encoding_identity_and_names():
    assert AugmentPipe.augment_dim == 9 and AugmentPipe().augment_dim == len(AUGMENT_LABEL_NAMES) == 9
    torch.manual_seed(0)
    images = smooth_images(8, 2)
    out, labels = AugmentPipe(p=1)(dict(image=images)) # All ops disabled: identity.
    assert torch.equal(out['image'], images) and (labels == 0).all()
    # Ops that draw nothing (identity parameters) still give exact zeros, e.g. yflip with flip = 0.
    torch.manual_seed(1)
    out, labels = AugmentPipe(p=1, yflip=1)(dict(image=images))
    for i in range(8):
        assert (labels[i, 2:] == 0).all() and labels[i, 0] == 0
        expected = images[i].flip(1) if labels[i, 1] == 1 else images[i]
        assert torch.equal(out['image'][i], expected)

def test_xflip_exact():
    torch.manual_seed(3)
    images = smooth_images(32, 1)
    batch = dict(image=images)
    out, labels = AugmentPipe(p=1, xflip=1)(batch)
    assert batch['image'] is images and torch.equal(images, smooth_images(32, 1)) # Input untouched.
    flipped = labels[:, 0] == 1
    assert 0 < flipped.sum() < 32 and set(labels[:, 0].tolist()) <= {0.0, 1.0} and (labels[:, 1:] == 0).all()
    for i in range(32):
        assert torch.equal(out['image'][i], images[i].flip(-1) if flipped[i] else images[i])

def test_rotate_int_exact_and_labels():
    torch.manual_seed(4)
    images = smooth_images(16, 2)
    out, labels = AugmentPipe(p=1, rotate_int=1)(dict(image=images))
    for i in range(16):
        c, s = labels[i, 3] + 1, labels[i, 4]
        k = {(1, 0): 0, (0, 1): 1, (-1, 0): 2, (0, -1): 3}[(int(c), int(s))]
        assert torch.equal(out['image'][i], torch.rot90(images[i], -k, dims=(1, 2)))

def test_joint_transform_image_cond_mask():
    torch.manual_seed(5)
    images = smooth_images(16, 2, R=32)
    mask = (images[:, :1] > 0.2).float()
    shifted = (mask.roll(1, dims=3) == mask).float().mean() # Agreement after a one-pixel shift, for scale.
    batch = dict(image=images, cond=images.clone(), mask=mask, label=torch.arange(16))
    out, labels = AugmentPipe(p=1, **EDM_KWARGS)(batch)
    assert (labels[:, 2:] != 0).any(dim=1).all() # Every sample got a non-trivial transform.
    assert torch.equal(out['cond'], out['image'])
    assert out['label'] is batch['label']
    assert set(out['mask'].unique().tolist()) <= {0.0, 1.0}
    agree = (out['mask'] == (out['image'][:, :1] > 0.2).float()).float().mean()
    assert agree > 0.95 and (1 - agree) < 0.5 * (1 - shifted), (agree, shifted) # Within about half a pixel.
    assert not torch.equal(out['image'], images)

@pytest.mark.parametrize('C', [1, 2, 5])
def test_channels_and_reproducibility(C):
    images = smooth_images(8, C)
    cond = smooth_images(8, 3, seed=1)
    mask = torch.zeros(8, 1, 16, 16, dtype=torch.bool)
    mask[:, :, 4:12, 4:12] = True
    pipe = AugmentPipe(p=0.5, **EDM_KWARGS, rotate_int=1, translate_int=1)
    torch.manual_seed(7)
    out1, labels1 = pipe(dict(image=images, cond=cond, mask=mask))
    torch.manual_seed(7)
    out2, labels2 = pipe(dict(image=images, cond=cond, mask=mask))
    assert out1['image'].shape == (8, C, 16, 16) and out1['cond'].shape == (8, 3, 16, 16)
    assert out1['mask'].dtype == torch.bool and out1['mask'].shape == (8, 1, 16, 16)
    for key in ('image', 'cond', 'mask'):
        assert torch.equal(out1[key], out2[key])
    assert torch.equal(labels1, labels2) and labels1.shape == (8, 9)
    torch.manual_seed(8)
    _, labels3 = pipe(dict(image=images))
    assert not torch.equal(labels1, labels3)

def test_pure_translation_and_scale_geometry():
    images = torch.zeros(1, 1, 16, 16)
    images[0, 0, 6:10, 6:10] = 1
    torch.manual_seed(0)
    pipe = AugmentPipe(p=1, translate_int=1, translate_int_max=0.25)
    out, labels = pipe(dict(image=images))
    dx, dy = round(labels[0, 7].item() * 16), round(labels[0, 8].item() * 16)
    assert labels[0, 7] * 16 == dx and labels[0, 8] * 16 == dy
    expected = torch.zeros(1, 1, 16, 16)
    expected[0, 0, 6 + dy:10 + dy, 6 + dx:10 + dx] = 1
    assert torch.allclose(out['image'], expected, atol=1e-5)

def test_bad_inputs_and_persistence():
    with pytest.raises(ValueError, match='xflip'):
        AugmentPipe(xflip=-1)
    with pytest.raises(ValueError, match='p is a probability'):
        AugmentPipe(p=2)
    pipe = AugmentPipe(p=1, xflip=1)
    with pytest.raises(ValueError, match='image'):
        pipe(dict(cond=torch.zeros(1, 1, 4, 4)))
    with pytest.raises(ValueError, match='mask'):
        pipe(dict(image=torch.zeros(2, 1, 4, 4), mask=torch.zeros(2, 1, 4, 5)))
    pipe = AugmentPipe(p=0.12, **EDM_KWARGS)
    clone = persistence.RestrictedUnpickler(io.BytesIO(pickle.dumps(pipe))).load()
    assert type(clone) is AugmentPipe and clone.init_kwargs == pipe.init_kwargs and clone.p == 0.12

#----------------------------------------------------------------------------
