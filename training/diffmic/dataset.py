# medEDM: diffusion-model training toolkit for medical imaging.

"""Classification data in class folders, with a seeded stratified split file.

Layout (APTOS 2019, HAM10000 and the demo data alike):

    <root>/train/<class>/*.png|jpg|jpeg|bmp|tif     training + validation images
    <root>/test/<class>/*                           test images (classes must be known from train/)

Classes are the sorted sub-folder names of train/. Images of any size, grey
or RGB, are centre-cropped to a square, resized to `resolution` (bilinear,
antialiased) and mapped to [-1, 1]. The train/ images are split per class into
train and validation (default 80/20) with `split_seed`; the split is saved as
JSON (relative paths per part, the seed and fraction) at `split_file`
(default `<root>/split-seed<seed>-val<fraction>.json`) and reused when it
exists, so every run and stage sees the same split. With `group_pattern` (a
regular expression; its first group, or the whole match, in each file name
names the patient / subject / lesion) the split keeps every group whole: the
validation part gets whole groups in a seeded random order until it holds
val_fraction of the images (then stratified only on average), so that no
patient has images on both sides (images of one patient are more alike than
images of two: a per-image split lets the validation accuracy measure
recognition of patients seen in training). The pattern is stored in the split
file, and a saved split made with another pattern (or none) is refused, so two
stages or runs cannot silently use different splits of one root.

Items: `image` (C, R, R) float32, `onehot` (K,) float32 (the class to predict:
the family's target key, not `label`, which the engine's contract keeps for a
class CONDITION of the network), `class_idx` int64, `idx`.
`device_transform` applies the reference's train augmentation on the device
(random horizontal and, optionally, vertical flips and a rotation in
[-rotate_deg, rotate_deg]) when `augment` is true."""

import json
import math
import os
import re

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from torch_utils import persistence

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff')
SPLITS = ('train', 'val', 'test')

#----------------------------------------------------------------------------
# Folders and images.

def list_class_folders(folder: str) -> dict[str, list[str]]:
    """{class: sorted image paths} of <folder>/<class>/*; ValueError naming an empty class folder."""
    if not os.path.isdir(folder):
        raise ValueError(f'dataset: class-folder directory not found: {folder}')
    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)) and not d.startswith('.'))
    if not classes:
        raise ValueError(f'dataset: {folder} has no class sub-folders (expected {folder}/<class>/*.png)')
    out = {}
    for c in classes:
        files = sorted(os.path.join(folder, c, f) for f in os.listdir(os.path.join(folder, c)) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise ValueError(f'dataset: class folder {os.path.join(folder, c)} is empty (no {"/".join(IMAGE_EXTENSIONS)} images)')
        out[c] = files
    return out

def load_image(path: str, resolution: int, channels: int) -> np.ndarray:
    """Centre-crop to a square, resize, -> (C, R, R) uint8; ValueError naming an unreadable file."""
    try:
        with Image.open(path) as im:
            im = im.convert('L' if channels == 1 else 'RGB')
            w, h = im.size
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            im = im.crop((left, top, left + side, top + side))
            if side != resolution:
                im = im.resize((resolution, resolution), Image.BILINEAR, reducing_gap=None)
            a = np.asarray(im, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise ValueError(f'dataset: cannot read image {path} ({type(err).__name__}: {err})') from None
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)

#----------------------------------------------------------------------------
# Seeded stratified split of train/ into train and validation.

def class_of(rel: str) -> str:
    """The class of an image path relative to the root: <split>/<class>/<file>."""
    return rel.replace(os.sep, '/').split('/')[1]

def _check_parts(parts: dict, classes, root: str, why: str) -> None:
    for c in classes:
        for part in ('train', 'val'):
            if not any(class_of(r) == c for r in parts[part]):
                raise ValueError(f'dataset: class {c!r} ({os.path.join(root, "train", c)}) has no image in the {part} part: {why}')

def _shown(pattern: str | None) -> str:
    return 'null' if pattern is None else f"'{pattern}'"

def group_of(path: str, pattern: str) -> str:
    """The group (patient, subject, lesion) of an image: the first group of `pattern` in its file name, or the whole match."""
    m = re.search(pattern, os.path.basename(path))
    if m is None:
        raise ValueError(f'training.dataset.group_pattern={_shown(pattern)} does not match the file name of {path}')
    return m.group(1) if m.groups() else m.group(0)

def make_split(files: dict[str, list[str]], val_fraction: float, seed: int, root: str, group_pattern: str | None = None) -> dict:
    if not 0 < val_fraction < 1:
        raise ValueError(f'training.dataset.val_fraction must be in (0, 1), got {val_fraction}')
    rng = np.random.default_rng(seed)
    parts = dict(train=[], val=[])
    if group_pattern is not None:
        try:
            re.compile(group_pattern)
        except re.error as err:
            raise ValueError(f'training.dataset.group_pattern={_shown(group_pattern)} is not a regular expression ({err})') from None
        groups = {}
        for paths in files.values():
            for p in paths:
                groups.setdefault(group_of(p, group_pattern), []).append(os.path.relpath(p, root))
        names = sorted(groups)
        target = int(round(sum(len(g) for g in groups.values()) * val_fraction))
        for name in (names[i] for i in rng.permutation(len(names))):
            parts['val' if len(parts['val']) < target else 'train'] += groups[name]
        parts = {part: sorted(rel) for part, rel in parts.items()}
        _check_parts(parts, files, root, f'a split of whole groups (group_pattern={_shown(group_pattern)}, {len(names)} groups) '
            f'needs more groups or another val_fraction ({val_fraction:g}) / split_seed ({seed})')
        return dict(classes=list(files), seed=int(seed), val_fraction=float(val_fraction), group_pattern=group_pattern, **parts)
    for c, paths in files.items():
        n_val = int(round(len(paths) * val_fraction))
        if n_val < 1 or len(paths) - n_val < 1:
            raise ValueError(f'dataset: class {c!r} has {len(paths)} image(s) in {os.path.join(root, "train", c)}; a '
                f'{1 - val_fraction:.0%}/{val_fraction:.0%} train/validation split needs at least one of each '
                f'(>= {math.ceil(1 / min(val_fraction, 1 - val_fraction))} images)')
        order = rng.permutation(len(paths))
        rel = [os.path.relpath(paths[i], root) for i in order]
        parts['val'] += sorted(rel[:n_val])
        parts['train'] += sorted(rel[n_val:])
    return dict(classes=list(files), seed=int(seed), val_fraction=float(val_fraction), **parts)

def load_or_make_split(root: str, split_file: str | None, val_fraction: float, seed: int, group_pattern: str | None = None) -> dict:
    """The split of <root>/train: read from `split_file` if it exists, else made and saved there."""
    files = list_class_folders(os.path.join(root, 'train'))
    path = split_file or os.path.join(root, f'split-seed{seed}-val{val_fraction:g}.json')
    if os.path.isfile(path):
        try:
            with open(path, encoding='utf-8') as f:
                split = json.load(f)
            assert isinstance(split, dict) and all(isinstance(split.get(k), list) for k in ('classes', 'train', 'val'))
        except (ValueError, AssertionError, UnicodeDecodeError):
            raise ValueError(f'training.dataset.split_file: {path} is not a split file (JSON with classes, train, val)') from None
        if split['classes'] != list(files):
            raise ValueError(f'training.dataset.split_file: {path} lists the classes {split["classes"]}, but {root}/train has {list(files)}')
        if split.get('group_pattern') != group_pattern:
            raise ValueError(f'training.dataset.split_file: {path} was made with group_pattern={_shown(split.get("group_pattern"))}, '
                f'the dataset has group_pattern={_shown(group_pattern)}; remove the file or name another split_file')
        return split
    split = make_split(files, val_fraction, seed, root, group_pattern)
    persistence.atomic_write_bytes(path, json.dumps(split, indent=1).encode('utf-8'))
    return split

#----------------------------------------------------------------------------

class ClassFolderDataset(torch.utils.data.Dataset):
    def __init__(self,
        path,                       # Root with train/<class>/ and test/<class>/.
        split           = 'train',  # 'train', 'val' (both from train/ via the split file) or 'test'.
        resolution      = 32,       # Output size (centre crop, then resize).
        channels        = 1,        # 1 = grey, 3 = RGB.
        val_fraction    = 0.2,      # Validation share of each class of train/.
        split_seed      = 0,        # Seed of the stratified split.
        split_file      = None,     # Split JSON, None = <path>/split-seed<seed>-val<fraction>.json.
        group_pattern   = None,     # Regex naming each file's patient/subject (first group): split whole groups; None = per image.
        augment         = False,    # Random flips and rotation in device_transform (training only).
        rotate_deg      = 30,       # Rotation range of the augmentation (degrees).
        vflip           = False,    # Also flip vertically (the reference does for APTOS).
        max_size        = None,     # Keep only the first max_size items, None = all.
    ):
        if split not in SPLITS:
            raise ValueError(f'training.dataset.split: expected one of {SPLITS}, got {split!r}')
        if channels not in (1, 3):
            raise ValueError(f'training.dataset.channels: expected 1 (grey) or 3 (RGB), got {channels!r}')
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 8:
            raise ValueError(f'training.dataset.resolution: expected an integer >= 8, got {resolution!r}')
        self.path, self.split_name = os.fspath(path), split
        self._resolution, self._channels = resolution, channels
        self.augment, self.rotate_deg, self.vflip = bool(augment), float(rotate_deg), bool(vflip)
        split_data = load_or_make_split(self.path, split_file, val_fraction, split_seed, group_pattern)
        self.classes = list(split_data['classes'])
        index = {c: k for k, c in enumerate(self.classes)}
        if split == 'test':
            test = list_class_folders(os.path.join(self.path, 'test'))
            unknown = [c for c in test if c not in index]
            if unknown:
                raise ValueError(f'dataset: test class {unknown[0]!r} ({os.path.join(self.path, "test", unknown[0])}) is not a '
                    f'class of the training data ({", ".join(self.classes)})')
            rel = [os.path.relpath(p, self.path) for c in test for p in test[c]]
        else:
            rel = list(split_data[split])
        if max_size is not None:
            rel = rel[:int(max_size)]
        self.files = rel
        self.class_idx = np.array([index[class_of(r)] for r in rel], dtype=np.int64)
        self._images = np.stack([load_image(os.path.join(self.path, r), resolution, channels) for r in rel])

    # The engine's dataset interface. ------------------------------------------

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, idx: int) -> dict:
        idx = int(idx)
        onehot = np.zeros([len(self.classes)], dtype=np.float32)
        onehot[self.class_idx[idx]] = 1
        image = self._images[idx].astype(np.float32) / 127.5 - 1
        return dict(image=image, onehot=onehot, class_idx=self.class_idx[idx], idx=idx)

    @property
    def name(self) -> str:
        return os.path.basename(self.path.rstrip('/'))

    @property
    def image_shape(self) -> list[int]:
        return [self._channels, self._resolution, self._resolution]

    @property
    def num_channels(self) -> int:
        return self._channels

    @property
    def resolution(self) -> int:
        return self._resolution

    @property
    def label_dim(self) -> int:
        return len(self.classes)

    @property
    def has_labels(self) -> bool:
        return True

    def get_label(self, idx: int) -> np.ndarray:
        return self[idx]['onehot']

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.class_idx, minlength=len(self.classes))

    # Train augmentation on the device (seeded by the loop's per-step seed). ----

    def device_transform(self, batch: dict) -> dict:
        if not self.augment:
            return batch
        return dict(batch, image=augment_images(batch['image'], self.rotate_deg, self.vflip))

#----------------------------------------------------------------------------
# Random flips and rotation (bilinear, zero padding = -1 background), from torch's global generator.

def augment_images(x: torch.Tensor, rotate_deg: float, vflip: bool) -> torch.Tensor:
    n = x.shape[0]
    sx = torch.where(torch.rand(n, device=x.device) < 0.5, -1.0, 1.0)
    sy = torch.where(torch.rand(n, device=x.device) < 0.5, -1.0, 1.0) if vflip else torch.ones(n, device=x.device)
    theta = (torch.rand(n, device=x.device) * 2 - 1) * math.radians(rotate_deg)
    c, s = theta.cos(), theta.sin()
    mat = torch.stack([torch.stack([c * sx, -s * sy, torch.zeros_like(c)], 1), torch.stack([s * sx, c * sy, torch.zeros_like(c)], 1)], 1)
    grid = torch.nn.functional.affine_grid(mat.to(x.dtype), list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x + 1, grid, mode='bilinear', padding_mode='zeros', align_corners=False) - 1

#----------------------------------------------------------------------------
