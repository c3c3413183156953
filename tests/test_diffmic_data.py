# medEDM: DiffMIC data: class folders, the seeded stratified split file, the
# MNI152 demo builder, the train augmentation, the DCG's patches, and the
# messages for bad input.

import glob
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from training.diffmic import dataset as dm_dataset
from training.diffmic.dataset import ClassFolderDataset
from training.diffmic.dcg import DCGNet, top_k_patches
from training.diffmic.loss import LabelEDMLoss

#----------------------------------------------------------------------------

def make_folders(root, counts: dict, test_counts: dict | None = None, size=(20, 12), mode='L'):
    rng = np.random.default_rng(0)
    for split, cs in (('train', counts), ('test', test_counts or {})):
        for c, n in cs.items():
            os.makedirs(root / split / c, exist_ok=True)
            for i in range(n):
                shape = (size[1], size[0]) if mode == 'L' else (size[1], size[0], 3)
                Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(root / split / c / f'{i}.png')
    return str(root)

def test_split_is_stratified_seeded_saved_and_reused(tmp_path):
    root = make_folders(tmp_path, dict(a=10, b=5, c=20), dict(a=2, b=2, c=2))
    train = ClassFolderDataset(root, split='train', resolution=8)
    val = ClassFolderDataset(root, split='val', resolution=8)
    assert train.classes == ['a', 'b', 'c'] and train.label_dim == 3
    assert val.class_counts().tolist() == [2, 1, 4] and train.class_counts().tolist() == [8, 4, 16]
    assert not set(train.files) & set(val.files)
    split_path = tmp_path / 'split-seed0-val0.2.json'
    saved = json.loads(split_path.read_text())
    assert saved['seed'] == 0 and saved['val'] == val.files
    other = ClassFolderDataset(root, split='val', resolution=8, split_seed=1)
    assert other.files != val.files and other.class_counts().tolist() == [2, 1, 4]
    # The saved file wins over a re-draw: edit it and the dataset follows.
    saved['val'], saved['train'] = saved['val'][:3], saved['train'] + saved['val'][3:]
    split_path.write_text(json.dumps(saved))
    assert len(ClassFolderDataset(root, split='val', resolution=8)) == 3
    test = ClassFolderDataset(root, split='test', resolution=8)
    assert len(test) == 6 and test.class_idx.tolist() == [0, 0, 1, 1, 2, 2]

def _grouped_folders(root, patients: int, per_patient: int, classes=('a', 'b')):
    """Patient p has per_patient images, spread over the classes: train/<class>/p<p>_<j>.png."""
    rng = np.random.default_rng(1)
    for p in range(patients):
        for j in range(per_patient):
            c = classes[(p + j) % len(classes)]
            os.makedirs(root / 'train' / c, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), mode='L').save(root / 'train' / c / f'p{p:02d}_{j}.png')
    return str(root)

def test_grouped_split_keeps_every_patient_on_one_side(tmp_path):
    root = _grouped_folders(tmp_path, patients=20, per_patient=5)
    kw = dict(resolution=8, group_pattern=r'^(p\d+)_')
    train, val = ClassFolderDataset(root, split='train', **kw), ClassFolderDataset(root, split='val', **kw)
    patients = lambda ds: {os.path.basename(f).split('_')[0] for f in ds.files}
    # Whole patients: 4 of the 20 (20 % of the 100 images), none on both sides, every image once.
    assert len(val) == 20 and len(train) == 80 and len(patients(val)) == 4 and not patients(train) & patients(val)
    assert sorted(train.files + val.files) == sorted(os.path.relpath(os.path.join(d, f), root)
        for d, _, fs in os.walk(os.path.join(root, 'train')) for f in fs)
    saved = json.loads((tmp_path / 'split-seed0-val0.2.json').read_text())
    assert saved['group_pattern'] == r'^(p\d+)_' and saved['val'] == val.files
    assert patients(ClassFolderDataset(root, split='val', split_seed=1, **kw)) != patients(val) # Seeded.
    # The per-image split of the same folders puts patients on both sides (what the grouping prevents) ...
    other = dict(resolution=8, split_file=str(tmp_path / 'per-image.json'))
    assert patients(ClassFolderDataset(root, split='train', **other)) & patients(ClassFolderDataset(root, split='val', **other))
    # ... and a stage without the pattern cannot silently split the same root another way.
    with pytest.raises(ValueError, match=re.escape("split-seed0-val0.2.json was made with group_pattern='^(p\\d+)_', the dataset has group_pattern=null")):
        ClassFolderDataset(root, split='train', resolution=8)

def test_grouped_split_messages(tmp_path):
    root = _grouped_folders(tmp_path, patients=4, per_patient=2)
    q, pat = r'^(q\d+)_', r'^(p\d+)_'
    with pytest.raises(ValueError, match=re.escape(f"training.dataset.group_pattern='{q}' does not match the file name of ") + r'.*train/a/p00_0.png'):
        ClassFolderDataset(root, group_pattern=q)
    with pytest.raises(ValueError, match=re.escape("training.dataset.group_pattern='(' is not a regular expression")):
        ClassFolderDataset(root, group_pattern='(')
    # 1 % of 8 images rounds to no validation image at all: the message names the class and the grouping.
    with pytest.raises(ValueError, match=r"class 'a' .* has no image in the val part: a split of whole groups " + re.escape(f"(group_pattern='{pat}', 4 groups)")):
        ClassFolderDataset(root, group_pattern=pat, val_fraction=0.01)
    # A saved per-image split is not silently reused for a grouped one.
    ClassFolderDataset(root, split_file=str(tmp_path / 's.json'))
    with pytest.raises(ValueError, match=re.escape(f"s.json was made with group_pattern=null, the dataset has group_pattern='{pat}'; remove the file")):
        ClassFolderDataset(root, split_file=str(tmp_path / 's.json'), group_pattern=pat)

def test_demo_configs_split_the_demo_subjects(tmp_path):
    from training.diffmic import phantoms
    import yaml
    for name in ('diffmic_dcg', 'diffmic_edm'):
        cfg = yaml.safe_load(open(os.path.join(os.path.dirname(__file__), '..', 'configs', f'{name}.yaml')))
        assert cfg['training']['dataset']['group_pattern'] == phantoms.GROUP_PATTERN
    phantoms.write_class_folders(str(tmp_path), 'train', dict(images=np.zeros((3, 8, 8), np.uint8), labels=np.array([0, 1, 0]), subject=np.array([7, 7, 12])))
    names = sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / 'train' / '*' / '*.png')))
    assert names == ['train-s0007-00000.png', 'train-s0007-00001.png', 'train-s0012-00002.png']
    assert [dm_dataset.group_of(n, phantoms.GROUP_PATTERN) for n in names] == ['train-s0007', 'train-s0007', 'train-s0012']

def test_items_centre_crop_resize_grey_and_rgb(tmp_path):
    root = tmp_path / 'd'
    os.makedirs(root / 'train' / 'x')
    os.makedirs(root / 'train' / 'y')
    a = np.zeros((12, 20), np.uint8)
    a[:, 4:16] = 255 # The centre 12 x 12 square is white.
    for c in ('x', 'y'):
        for i in range(5):
            Image.fromarray(a).save(root / 'train' / c / f'{i}.png')
    ds = ClassFolderDataset(str(root), resolution=8)
    item = ds[0]
    assert item['image'].shape == (1, 8, 8) and np.allclose(item['image'], 1)
    assert item['onehot'].tolist() == [1, 0] and item['class_idx'] == 0 and 'label' not in item # Not a class condition.
    rgb = ClassFolderDataset(str(root), resolution=8, channels=3)
    assert rgb[0]['image'].shape == (3, 8, 8)

def test_augmentation_flips_and_rotates_seeded():
    x = torch.linspace(-1, 1, 2 * 1 * 8 * 8).reshape(2, 1, 8, 8)
    torch.manual_seed(0)
    y = dm_dataset.augment_images(x, rotate_deg=0, vflip=False)
    for i in range(2): # No rotation: each image is itself or its mirror.
        assert torch.allclose(y[i], x[i], atol=1e-5) or torch.allclose(y[i], x[i].flip(-1), atol=1e-5)
    torch.manual_seed(1)
    a = dm_dataset.augment_images(x, 30, True)
    torch.manual_seed(1)
    assert torch.equal(a, dm_dataset.augment_images(x, 30, True))

def test_top_k_patches_follow_the_saliency_peaks():
    images = torch.arange(64.).reshape(1, 1, 8, 8)
    sal = torch.zeros(1, 8, 8)
    sal[0, 6, 1] = 2
    sal[0, 6, 2] = 1.5 # Inside the first patch: suppressed.
    sal[0, 1, 5] = 1
    patches, corners = top_k_patches(images, sal, 2, 3)
    assert corners[0].tolist() == [[5, 0], [0, 4]]
    assert torch.equal(patches[0, 0, 0], images[0, 0, 5:8, 0:3]) and torch.equal(patches[0, 1, 0], images[0, 0, 0:3, 4:7])

def test_demo_builder_is_seeded_and_balanced(tmp_path):
    from training.diffmic import phantoms
    a = phantoms.build_lesion_slices(resolution=16, per_class=3, seed=4)
    b = phantoms.build_lesion_slices(resolution=16, per_class=3, seed=4)
    assert np.array_equal(a['images'], b['images']) and np.bincount(a['labels']).tolist() == [3, 3, 3, 3]
    # A finding changes the slice; healthy slices come from the subjects alone.
    assert a['images'].dtype == np.uint8 and a['images'].shape == (12, 16, 16)

#----------------------------------------------------------------------------
# Bad input: one message naming the file or class.

def test_empty_class_folder(tmp_path):
    root = make_folders(tmp_path, dict(a=5, b=5))
    os.makedirs(tmp_path / 'train' / 'c')
    with pytest.raises(ValueError, match=r'class folder .*train/c is empty'):
        ClassFolderDataset(root)

def test_unreadable_image(tmp_path):
    root = make_folders(tmp_path, dict(a=5, b=5))
    (tmp_path / 'train' / 'b' / 'broken.png').write_bytes(b'not a png')
    with pytest.raises(ValueError, match=r'cannot read image .*train/b/broken.png'):
        ClassFolderDataset(root, split='train')

def test_unknown_test_class(tmp_path):
    root = make_folders(tmp_path, dict(a=5, b=5), dict(a=1, zebra=1))
    with pytest.raises(ValueError, match=r"test class 'zebra' .*test/zebra.* is not a class of the training data \(a, b\)"):
        ClassFolderDataset(root, split='test')

def test_fewer_images_than_the_split_needs(tmp_path):
    root = make_folders(tmp_path, dict(a=5, b=2))
    with pytest.raises(ValueError, match=r"class 'b' has 2 image\(s\) in .*train/b; a 80%/20% train/validation split needs"):
        ClassFolderDataset(root)

def test_dcg_with_another_number_of_classes():
    loss = LabelEDMLoss()
    dcg = DCGNet(16, 1, 3)
    with pytest.raises(ValueError, match=r'training.frozen.dcg: the DCG snapshot classifies 3 classes, but the data have 4'):
        loss.network_interface(dict(img_resolution=16, img_channels=1, label_dim=4), dict(dcg=dcg))
    with pytest.raises(ValueError, match=r"training.loss.dcg='dcg': no such network in training.frozen"):
        loss.network_interface(dict(img_resolution=16, img_channels=1, label_dim=4), {})

#----------------------------------------------------------------------------
