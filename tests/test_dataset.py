# medEDM: tests of training/dataset.py and training/image_io.py.

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from training.dataset import Dataset, ImageFolderDataset, NpzDataset
from training.image_io import auto_grid_size, save_image_grid, save_png

#----------------------------------------------------------------------------
# Helpers.

def write_png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path) # uint8 -> L or RGB, uint16 -> I;16.

#----------------------------------------------------------------------------
# NpzDataset.

def test_npz_roundtrip_with_int_labels(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, size=(5, 2, 8, 8)).astype(np.float32)
    labels = np.array([0, 2, 1, 2, 0])
    np.savez(tmp_path / 'd.npz', images=images, cls=labels)
    ds = NpzDataset(str(tmp_path / 'd.npz'), label_key='cls')
    assert isinstance(ds, Dataset) and isinstance(ds, torch.utils.data.Dataset)
    assert len(ds) == 5 and ds.name == 'd'
    assert ds.resolution == 8 and ds.num_channels == 2 and ds.image_shape == [2, 8, 8] and ds.label_dim == 3
    item = ds[1]
    assert set(item) == {'image', 'label', 'idx'} and item['idx'] == 1
    assert item['image'].dtype == np.float32 and np.array_equal(item['image'], images[1])
    assert item['label'].dtype == np.float32 and item['label'].tolist() == [0, 0, 1]
    assert ds[-1]['idx'] == 4
    with pytest.raises(IndexError):
        ds[5]

def test_npz_hw_vectors_max_size_and_no_labels(tmp_path):
    images = np.arange(4 * 6 * 6, dtype=np.float64).reshape(4, 6, 6)
    vec = np.array([[0.5, 1.0], [2, 3], [4, 5], [6, 7]])
    np.savez(tmp_path / 'd.npz', x=images, v=vec)
    ds = NpzDataset(tmp_path / 'd.npz', key='x', label_key='v', max_size=2)
    assert len(ds) == 2 and ds.image_shape == [1, 6, 6] and ds.label_dim == 2
    assert np.array_equal(ds[1]['image'][0], images[1].astype(np.float32))
    assert ds[0]['label'].tolist() == [0.5, 1.0]
    ds = NpzDataset(tmp_path / 'd.npz', key='x')
    assert ds.label_dim == 0 and 'label' not in ds[0]
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch['image'].shape == (4, 1, 6, 6) and batch['idx'].tolist() == [0, 1, 2, 3]

def test_npz_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='dataset.path'):
        NpzDataset(str(tmp_path / 'missing.npz'))
    np.savez(tmp_path / 'd.npz', images=np.zeros((2, 1, 4, 4), np.float32), rect=np.zeros((2, 1, 4, 5), np.float32),
        bad=np.full((2, 1, 4, 4), np.nan, np.float32), s=np.zeros((2, 1, 4, 4), np.int16))
    with pytest.raises(ValueError, match='dataset.key'):
        NpzDataset(tmp_path / 'd.npz', key='nope')
    with pytest.raises(ValueError, match='dataset.label_key'):
        NpzDataset(tmp_path / 'd.npz', label_key='nope')
    with pytest.raises(ValueError, match='square'):
        NpzDataset(tmp_path / 'd.npz', key='rect')
    with pytest.raises(ValueError, match='NaN'):
        NpzDataset(tmp_path / 'd.npz', key='bad')
    with pytest.raises(ValueError, match='dataset.intensity'):
        NpzDataset(tmp_path / 'd.npz', key='s')
    with pytest.raises(ValueError, match='dataset.max_size'):
        NpzDataset(tmp_path / 'd.npz', max_size=0)
    (tmp_path / 'junk.npz').write_bytes(b'not a zip file at all')
    with pytest.raises(ValueError, match='junk.npz'):
        NpzDataset(tmp_path / 'junk.npz')

def test_npz_uint8_default_range(tmp_path):
    np.savez(tmp_path / 'd.npz', images=np.array([[[[0, 255]]]] * 2, dtype=np.uint8).repeat(2, axis=2))
    ds = NpzDataset(tmp_path / 'd.npz')
    assert ds[0]['image'][0, 0].tolist() == [-1.0, 1.0]

#----------------------------------------------------------------------------
# Intensity normalisation.

def test_intensity_modes(tmp_path):
    x = np.linspace(0, 100, 4 * 4 * 2, dtype=np.float32).reshape(2, 1, 4, 4)
    np.savez(tmp_path / 'd.npz', images=x)
    ds = NpzDataset(tmp_path / 'd.npz', intensity={'mode': 'fixed', 'low': 0, 'high': 50})
    img = ds[1]['image']
    assert img.min() >= 1.0 and np.allclose(img, x[1] / 25 - 1) # No clipping in fixed mode.
    ds = NpzDataset(tmp_path / 'd.npz', intensity={'mode': 'percentile', 'low': 10, 'high': 90})
    img = ds[0]['image']
    lo, hi = np.percentile(x[0], [10, 90])
    assert img.min() == -1 and img.max() == 1
    assert np.allclose(img, (np.clip(x[0], lo, hi) - lo) / (hi - lo) * 2 - 1, atol=1e-6)
    np.savez(tmp_path / 'c.npz', images=np.full((1, 1, 4, 4), 3.0, np.float32))
    assert (NpzDataset(tmp_path / 'c.npz', intensity={'mode': 'percentile'})[0]['image'] == -1).all()
    for bad, key in [({'mode': 'zscore'}, 'dataset.intensity.mode'), ({'mode': 'fixed', 'low': 0}, 'dataset.intensity.high'),
            ({'mode': 'fixed', 'low': 0, 'high': 1, 'clip': True}, 'dataset.intensity.clip'),
            ({'mode': 'fixed', 'low': 2, 'high': 1}, 'dataset.intensity.low'),
            ({'mode': 'percentile', 'low': 1, 'high': 101}, 'dataset.intensity.low/high'), ('fixed', 'dataset.intensity')]:
        with pytest.raises(ValueError, match=key.replace('.', r'\.')):
            NpzDataset(tmp_path / 'd.npz', intensity=bad)

#----------------------------------------------------------------------------
# ImageFolderDataset.

def test_png_folder_8bit_rgb_and_gray(tmp_path):
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[0, 0] = [255, 0, 128]
    write_png(str(tmp_path / 'rgb' / 'b.png'), rgb)
    write_png(str(tmp_path / 'rgb' / 'sub' / 'a.png'), rgb)
    ds = ImageFolderDataset(str(tmp_path / 'rgb'))
    assert len(ds) == 2 and ds.image_shape == [3, 4, 4] and ds.label_dim == 0 and ds.name == 'rgb'
    img = ds[0]['image']
    assert img.dtype == np.float32 and np.allclose(img[:, 0, 0], [1.0, -1.0, 128 / 127.5 - 1], atol=1e-6)
    gray = np.arange(16, dtype=np.uint8).reshape(4, 4) * 17
    write_png(str(tmp_path / 'gray' / 'g.png'), gray)
    ds = ImageFolderDataset(tmp_path / 'gray')
    assert ds.image_shape == [1, 4, 4]
    assert np.allclose(ds[0]['image'][0], gray / 127.5 - 1)

def test_png_folder_16bit(tmp_path):
    a = np.array([[0, 65535], [32768, 1000]], dtype=np.uint16)
    write_png(str(tmp_path / 'x' / 'a.png'), a)
    ds = ImageFolderDataset(tmp_path / 'x')
    img = ds[0]['image']
    assert ds.num_channels == 1 and img[0, 0, 0] == -1.0 and img[0, 0, 1] == 1.0
    assert np.allclose(img[0], a / 32767.5 - 1, atol=1e-6)
    ds = ImageFolderDataset(tmp_path / 'x', intensity={'mode': 'fixed', 'low': 0, 'high': 1000})
    assert ds[0]['image'][0, 1, 1] == 1.0

def test_png_folder_labels(tmp_path):
    for name in ['a.png', 'sub/b.png', 'c.png']:
        write_png(str(tmp_path / name), np.zeros((4, 4), np.uint8))
    (tmp_path / 'dataset.json').write_text(json.dumps({'labels': [['a.png', 1], ['sub/b.png', 0], ['c.png', 3]]}))
    ds = ImageFolderDataset(tmp_path, use_labels=True)
    assert ds.label_dim == 4
    assert [ds[i]['label'].argmax() for i in range(3)] == [1, 3, 0] # Sorted: a.png, c.png, sub/b.png.
    (tmp_path / 'dataset.json').write_text(json.dumps({'labels': [['a.png', [0.5, 1]], ['sub/b.png', [0, 0]], ['c.png', [1, 1]]]}))
    ds = ImageFolderDataset(tmp_path, use_labels=True, max_size=2)
    assert len(ds) == 2 and ds.label_dim == 2 and ds[0]['label'].tolist() == [0.5, 1.0]
    (tmp_path / 'dataset.json').write_text(json.dumps({'labels': [['a.png', 1]]}))
    with pytest.raises(ValueError, match='c.png'):
        ImageFolderDataset(tmp_path, use_labels=True)
    os.remove(tmp_path / 'dataset.json')
    with pytest.raises(FileNotFoundError, match='dataset.json'):
        ImageFolderDataset(tmp_path, use_labels=True)
    assert 'label' not in ImageFolderDataset(tmp_path)[0]

def test_png_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r'nowhere.*dataset\.path'):
        ImageFolderDataset(str(tmp_path / 'nowhere'))
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match='no .png files'):
        ImageFolderDataset(tmp_path / 'empty')
    write_png(str(tmp_path / 'd' / 'a.png'), np.zeros((4, 4), np.uint8))
    write_png(str(tmp_path / 'd' / 'b.png'), np.zeros((8, 8), np.uint8))
    (tmp_path / 'd' / 'c.png').write_bytes(b'\x89PNG garbage bytes, not an image')
    write_png(str(tmp_path / 'd' / 'e.png'), np.zeros((4, 4), np.uint16))
    ds = ImageFolderDataset(tmp_path / 'd')
    assert ds[0]['image'].shape == (1, 4, 4)
    with pytest.raises(ValueError, match='b.png'):
        ds[1]
    with pytest.raises(ValueError, match='c.png'):
        ds[2]
    with pytest.raises(ValueError, match='e.png'):
        ds[3]
    (tmp_path / 'c').mkdir()
    (tmp_path / 'c' / 'a.png').write_bytes(b'garbage')
    with pytest.raises(ValueError, match='a.png'):
        ImageFolderDataset(tmp_path / 'c')
    write_png(str(tmp_path / 'r' / 'a.png'), np.zeros((4, 6), np.uint8))
    with pytest.raises(ValueError, match='square'):
        ImageFolderDataset(tmp_path / 'r')
    # A 16-bit RGB PNG (written by hand: Pillow cannot write one) is refused, not cut to its high bytes.
    import struct, zlib
    chunk = lambda tag, data: struct.pack('>I', len(data)) + tag + data + struct.pack('>I', zlib.crc32(tag + data))
    rgb16 = (np.arange(4 * 4 * 3).reshape(4, 4, 3) * 1000 + 7).astype('>u2')
    raw = b''.join(b'\x00' + row.tobytes() for row in rgb16)
    (tmp_path / 'h').mkdir()
    (tmp_path / 'h' / 'a.png').write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', 4, 4, 16, 2, 0, 0, 0))
        + chunk(b'IDAT', zlib.compress(raw)) + chunk(b'IEND', b''))
    with pytest.raises(ValueError, match=r"a.png: 16-bit colour PNG \(RGB;16B\): Pillow reads only the high byte"):
        ImageFolderDataset(tmp_path / 'h')[0]

#----------------------------------------------------------------------------
# image_io.

def test_save_image_grid_size(tmp_path):
    images = np.random.default_rng(0).uniform(-1, 1, size=(7, 1, 6, 5)).astype(np.float32)
    save_image_grid(images, tmp_path / 'g.png', grid_size=(4, 2))
    with Image.open(tmp_path / 'g.png') as img:
        assert img.size == (4 * 5, 2 * 6) and img.mode == 'L'
        top_left = np.array(img)[:6, :5]
    assert np.array_equal(top_left, np.clip(images[0, 0] * 127.5 + 128, 0, 255).astype(np.uint8))
    assert auto_grid_size(7) == (3, 3)
    save_image_grid(torch.zeros(5, 3, 4, 4), tmp_path / 'rgb.png')
    with Image.open(tmp_path / 'rgb.png') as img:
        assert img.size == (12, 8) and img.mode == 'RGB'
    save_image_grid(np.zeros((2, 2, 4, 4)), tmp_path / 'c2.png', grid_size=(2, 1))
    with Image.open(tmp_path / 'c2.png') as img:
        assert img.size == (2 * 2 * 4, 4)
    with pytest.raises(ValueError, match='grid_size'):
        save_image_grid(images, tmp_path / 'x.png', grid_size=(2, 2))
    assert sorted(os.listdir(tmp_path)) == ['c2.png', 'g.png', 'rgb.png'] # No temporary files left.

def test_save_png_16bit_roundtrip(tmp_path):
    rng = np.random.default_rng(1)
    image = rng.uniform(-1, 1, size=(1, 8, 8)).astype(np.float32)
    image[0, 0, :2] = [-1, 1]
    os.makedirs(tmp_path / 'a')
    save_png(image, tmp_path / 'a' / 'x.png', bits=16)
    with Image.open(tmp_path / 'a' / 'x.png') as img:
        assert img.mode == 'I;16'
    back = ImageFolderDataset(tmp_path / 'a')[0]['image']
    assert back[0, 0, 0] == -1 and back[0, 0, 1] == 1
    assert np.abs(back - image).max() <= 1 / 32767.5
    save_png(image, tmp_path / 'b.png', bits=8)
    with Image.open(tmp_path / 'b.png') as img:
        assert img.mode == 'L' and np.abs(np.array(img) / 127.5 - 1 - image[0]).max() <= 1 / 127.5
    with pytest.raises(ValueError, match='bits'):
        save_png(image, tmp_path / 'c.png', bits=12)

#----------------------------------------------------------------------------

#----------------------------------------------------------------------------
# Condition images from an npz (conditional EDM on any paired data).

def test_npz_cond_key(tmp_path):
    import numpy as np
    import pytest
    from training.dataset import NpzDataset
    images = np.random.default_rng(0).random((5, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / 'c.npz', images=images, cond=images[:, :, ::-1].copy() * 2)
    ds = NpzDataset(str(tmp_path / 'c.npz'), cond_key='cond')
    assert ds.cond_channels == 1
    assert np.array_equal(ds[3]['cond'], images[3, :, ::-1] * 2)
    assert NpzDataset(str(tmp_path / 'c.npz')).cond_channels == 0 and 'cond' not in NpzDataset(str(tmp_path / 'c.npz'))[0]
    np.savez(tmp_path / 'bad.npz', images=images, cond=images[:3])
    with pytest.raises(ValueError, match="training.dataset.cond_key: 'cond' in .* must be float \\(N, Cc, H, W\\) matching the images"):
        NpzDataset(str(tmp_path / 'bad.npz'), cond_key='cond')
