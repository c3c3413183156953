# medEDM: diffusion-model training toolkit for medical imaging.

"""Datasets of 2-D images and 3-D volumes as dicts of numpy arrays.

Every sample is a dict: `image` float32 (C, H, W) or (C, D, H, W), already mapped to about
[-1, 1] by an explicit intensity normalisation; `label` float32 (label_dim,)
when the dataset has labels (one-hot for integer classes); optional `cond`
(condition images of the same spatial size) and `mask`; `idx` (int). NIfTI
volumes also carry `affine` (4 x 4 float64, the voxel-to-world matrix of the
item as cropped), metadata that travels beside the tensors, never into the
network.
Constructor arguments are plain values so that a config (`_target_` plus
kwargs, or EDM's `class_name`) can build a dataset.

Intensity normalisation (`intensity` argument, config key `training.dataset.intensity`):
    None                                        format default: PNG [0, 2^bits-1] -> [-1, 1];
                                                npz float data as is, npz unsigned ints [0, max] -> [-1, 1]
    {'mode': 'fixed', 'low': a, 'high': b}      linear map a -> -1, b -> 1, no clipping
    {'mode': 'percentile', 'low': 0.5, 'high': 99.5}
                                                per-image percentiles (over all channels), clip, map to [-1, 1];
                                                a constant image becomes -1
"""

import collections.abc
import json
import os
import zipfile
import zlib

import numpy as np
import torch
from PIL import Image

#----------------------------------------------------------------------------
# Explicit intensity normalisation, validated at construction.

class IntensityNorm:
    def __init__(self,
        intensity,                  # None or dict(mode=..., low=..., high=...), see module docstring.
        default_range = None,       # (low, high) used when intensity is None; None = data as is.
    ):
        self.mode, self.low, self.high = None, None, None
        if intensity is None:
            if default_range is not None:
                self.mode, self.low, self.high = 'fixed', float(default_range[0]), float(default_range[1])
            return
        if not isinstance(intensity, collections.abc.Mapping):
            raise ValueError(f'training.dataset.intensity must be null or a dict with keys mode, low, high; got {intensity!r}')
        intensity = dict(intensity)
        for key in intensity:
            if key not in ('mode', 'low', 'high'):
                raise ValueError(f'training.dataset.intensity.{key}: unknown key (expected mode, low, high)')
        mode = intensity.get('mode')
        if mode not in ('fixed', 'percentile'):
            raise ValueError(f'training.dataset.intensity.mode must be "fixed" or "percentile", got {mode!r}')
        defaults = dict(low=0.5, high=99.5) if mode == 'percentile' else {}
        values = {}
        for key in ('low', 'high'):
            value = intensity.get(key, defaults.get(key))
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not np.isfinite(value):
                raise ValueError(f'training.dataset.intensity.{key} must be a finite number for mode "{mode}", got {value!r}')
            values[key] = float(value)
        if not values['low'] < values['high']:
            raise ValueError(f'training.dataset.intensity.low ({values["low"]}) must be below training.dataset.intensity.high ({values["high"]})')
        if mode == 'percentile' and not (0 <= values['low'] and values['high'] <= 100):
            raise ValueError(f'training.dataset.intensity.low/high are percentiles in [0, 100] for mode "percentile", '
                f'got {values["low"]}, {values["high"]}')
        self.mode, self.low, self.high = mode, values['low'], values['high']

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float32)
        if self.mode is None:
            return x
        if self.mode == 'fixed':
            lo, hi = self.low, self.high
        else:
            lo, hi = (float(v) for v in np.percentile(x, [self.low, self.high]))
            if not hi > lo:
                return np.full_like(x, -1)
            x = np.clip(x, lo, hi)
        return ((x - np.float32(lo)) / np.float32(hi - lo) * 2 - 1).astype(np.float32)

#----------------------------------------------------------------------------
# Labels: integer classes -> one-hot, 2-D float array -> vectors.

def _labels_to_float(labels: np.ndarray, where: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim == 1 and (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        labels = labels.astype(np.int64)
        if labels.size and labels.min() < 0:
            raise ValueError(f'{where}: integer class labels must be >= 0, got {labels.min()}')
        onehot = np.zeros([labels.shape[0], int(labels.max()) + 1 if labels.size else 0], dtype=np.float32)
        onehot[np.arange(labels.shape[0]), labels] = 1
        return onehot
    if labels.ndim == 2 and (np.issubdtype(labels.dtype, np.floating) or np.issubdtype(labels.dtype, np.integer)):
        labels = labels.astype(np.float32)
        if not np.isfinite(labels).all():
            raise ValueError(f'{where}: label vectors contain NaN or Inf')
        return labels
    raise ValueError(f'{where}: labels must be a 1-D integer array (classes) or a 2-D numeric array (vectors), '
        f'got dtype {labels.dtype} shape {labels.shape}')

#----------------------------------------------------------------------------
# Abstract base class: subclasses provide raw images and optional labels.

class Dataset(torch.utils.data.Dataset):
    def __init__(self,
        name,                   # Name of the dataset.
        raw_shape,              # Shape of the raw image data (N, C, H, W) or (N, C, D, H, W).
        max_size    = None,     # Keep only the first max_size items, None = all.
        intensity   = None,     # Intensity normalisation, see module docstring.
        default_range = None,   # Format-specific range for intensity=None.
    ):
        self._name = name
        self._raw_shape = list(raw_shape)
        if max_size is not None and (isinstance(max_size, bool) or not isinstance(max_size, (int, np.integer)) or max_size < 1):
            raise ValueError(f'training.dataset.max_size must be a positive integer or null, got {max_size!r}')
        self._size = self._raw_shape[0] if max_size is None else min(self._raw_shape[0], int(max_size))
        if self._size < 1:
            raise ValueError(f'dataset {name!r} is empty')
        if len(self._raw_shape) not in (4, 5):
            raise ValueError(f'dataset {name!r}: images must be (C, H, W) or volumes (C, D, H, W), got raw shape {self._raw_shape}')
        if len(self._raw_shape) == 4 and self._raw_shape[2] != self._raw_shape[3]:
            raise ValueError(f'dataset {name!r}: images must be square, got H x W = {self._raw_shape[2]} x {self._raw_shape[3]}')
        self._norm = IntensityNorm(intensity, default_range)
        self._labels = None

    def _load_raw_image(self, raw_idx: int) -> np.ndarray: # To be overridden: (C, H, W) array.
        raise NotImplementedError

    def _load_raw_labels(self) -> np.ndarray | None: # To be overridden: (N, label_dim) float32 or None.
        return None

    def _get_labels(self) -> np.ndarray | None:
        if self._labels is None:
            labels = self._load_raw_labels()
            self._labels = np.zeros([self._raw_shape[0], 0], dtype=np.float32) if labels is None else labels
        return self._labels if self._labels.shape[1] > 0 else None

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, idx: int) -> dict:
        idx = int(idx)
        if idx < 0:
            idx += self._size
        if not 0 <= idx < self._size:
            raise IndexError(f'dataset index {idx} out of range for {self._size} items')
        image = self._load_raw_image(idx)
        if list(image.shape) != self._raw_shape[1:]:
            raise ValueError(f'dataset {self._name!r}: item {idx} has shape {list(image.shape)}, expected {self._raw_shape[1:]}')
        item = dict(image=self._norm(image), idx=idx)
        labels = self._get_labels()
        if labels is not None:
            item['label'] = labels[idx].copy()
        return item

    def get_label(self, idx: int) -> np.ndarray | None:
        labels = self._get_labels()
        return None if labels is None else labels[idx].copy()

    @property
    def name(self) -> str:
        return self._name

    @property
    def image_shape(self) -> list[int]: # [C, H, W] or [C, D, H, W]
        return list(self._raw_shape[1:])

    @property
    def num_channels(self) -> int:
        return self._raw_shape[1]

    @property
    def resolution(self) -> int | list[int]: # H of square images; D (= H = W) of cubic volumes, else [D, H, W].
        spatial = self._raw_shape[2:]
        return spatial[0] if len(set(spatial)) == 1 else list(spatial)

    @property
    def label_dim(self) -> int:
        labels = self._get_labels()
        return 0 if labels is None else int(labels.shape[1])

    @property
    def has_labels(self) -> bool:
        return self.label_dim > 0

#----------------------------------------------------------------------------
# Check that a dataset path exists.

def _check_path(path) -> str:
    if path is None or not os.path.exists(os.fspath(path)):
        raise FileNotFoundError(f'dataset not found: {path} (set training.dataset.path)')
    return os.fspath(path)

#----------------------------------------------------------------------------
# Images (N, C, H, W) or (N, H, W), or volumes (N, C, D, H, W), in a .npz file.

class NpzDataset(Dataset):
    def __init__(self,
        path,                   # Path to the .npz file.
        key         = 'images', # Array of images, (N, C, H, W) or (N, H, W), or volumes (N, C, D, H, W).
        label_key   = None,     # Array of labels: (N,) integer classes or (N, D) vectors; None = no labels.
        cond_key    = None,     # Array of condition images (N, Cc, *spatial), used as is (no normalisation); None = none.
        mask_key    = None,     # Array of masks (N, Cm, *spatial) or (N, *spatial), 1 where the loss / inpainting applies; None = none.
        max_size    = None,     # Keep only the first max_size items, None = all.
        intensity   = None,     # Intensity normalisation, see module docstring.
    ):
        self._path = _check_path(path)
        self._cond = None
        self._mask = None
        try:
            npz = np.load(self._path, allow_pickle=False)
        except ValueError: # Neither zip nor .npy: np.load took it for a pickle.
            raise ValueError(f'training.dataset.path: {self._path} is not an .npz archive (not a zip file of .npy arrays)') from None
        except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as err: # Truncated or corrupt archive.
            raise ValueError(f'cannot read dataset file {self._path}: damaged .npz archive ({type(err).__name__}: {err})') from None
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise ValueError(f'training.dataset.path: {self._path} is not an .npz archive')
        with npz:
            for cfg_key, name in (('key', key), ('label_key', label_key), ('cond_key', cond_key), ('mask_key', mask_key)):
                if name is not None and name not in npz.files:
                    raise ValueError(f'training.dataset.{cfg_key}: array {name!r} not found in {self._path} (arrays: {sorted(npz.files)})')
            try:
                images = npz[key]
                labels = None if label_key is None else npz[label_key]
                cond = None if cond_key is None else npz[cond_key]
                mask = None if mask_key is None else npz[mask_key]
            except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as err: # A CRC error, a truncated member, ...
                raise ValueError(f'cannot read dataset file {self._path}: damaged .npz archive ({type(err).__name__}: {err})') from None
        if images.ndim == 3:
            images = images[:, None]
        if images.ndim not in (4, 5):
            raise ValueError(f'training.dataset.key: array {key!r} in {self._path} must be (N, C, H, W), (N, H, W) or (N, C, D, H, W), got shape {images.shape}')
        if images.shape[0] == 0:
            raise ValueError(f'training.dataset.path: array {key!r} in {self._path} holds 0 images')

        # Decide the default intensity range from the dtype.
        default_range = None
        if np.issubdtype(images.dtype, np.unsignedinteger):
            default_range = (0, np.iinfo(images.dtype).max)
        elif not np.issubdtype(images.dtype, np.floating):
            if intensity is None or images.dtype == bool or not np.issubdtype(images.dtype, np.integer):
                raise ValueError(f'training.dataset.intensity: array {key!r} in {self._path} has dtype {images.dtype}; '
                    f'use float or unsigned integer data, or set training.dataset.intensity for signed integers')
        else:
            bad = ~np.isfinite(images.reshape(images.shape[0], -1)).all(axis=1)
            if bad.any():
                raise ValueError(f'training.dataset.path: {self._path} array {key!r} has NaN or Inf in item {int(np.argmax(bad))}')
        self._images = images
        if labels is not None:
            labels = _labels_to_float(labels, f'training.dataset.label_key {label_key!r} in {self._path}')
            if labels.shape[0] != images.shape[0]:
                raise ValueError(f'training.dataset.label_key: {label_key!r} has {labels.shape[0]} labels for {images.shape[0]} images in {self._path}')
        self._npz_labels = labels
        axes = 'H, W' if images.ndim == 4 else 'D, H, W'
        if cond is not None:
            if cond.ndim == images.ndim - 1:
                cond = cond[:, None]
            if cond.ndim != images.ndim or cond.shape[0] != images.shape[0] or cond.shape[2:] != images.shape[2:] or not np.issubdtype(cond.dtype, np.floating):
                raise ValueError(f'training.dataset.cond_key: {cond_key!r} in {self._path} must be float (N, Cc, {axes}) '
                    f'matching the images {images.shape}, got {cond.dtype} {cond.shape}')
            self._cond = cond.astype(np.float32)
        if mask is not None:
            if mask.ndim == images.ndim - 1:
                mask = mask[:, None]
            if mask.ndim != images.ndim or mask.shape[0] != images.shape[0] or mask.shape[2:] != images.shape[2:]:
                raise ValueError(f'training.dataset.mask_key: {mask_key!r} in {self._path} must be (N, Cm, {axes}) '
                    f'matching the images {images.shape}, got {mask.shape}')
            if not np.isin(mask, (0, 1)).all():
                raise ValueError(f'training.dataset.mask_key: {mask_key!r} in {self._path} must hold 0 and 1 only')
            self._mask = mask.astype(np.float32)
        name = os.path.splitext(os.path.basename(self._path))[0]
        super().__init__(name=name, raw_shape=images.shape, max_size=max_size, intensity=intensity, default_range=default_range)

    def _load_raw_image(self, raw_idx):
        return self._images[raw_idx]

    def __getitem__(self, idx: int) -> dict:
        item = super().__getitem__(idx)
        if self._cond is not None:
            item['cond'] = self._cond[item['idx']]
        if self._mask is not None:
            item['mask'] = self._mask[item['idx']]
        return item

    @property
    def cond_channels(self) -> int:
        return 0 if self._cond is None else int(self._cond.shape[1])

    def _load_raw_labels(self):
        return self._npz_labels

#----------------------------------------------------------------------------
# Read a PNG as (C, H, W) plus its bit depth; ValueError naming the file.

_PNG_MODES = {'L': 8, 'LA': 8, 'RGB': 8, 'RGBA': 8, 'I;16': 16, 'I;16B': 16, 'I;16L': 16, 'I': 16}

def read_png(fname: str) -> tuple[np.ndarray, int]:
    try:
        with Image.open(fname) as img:
            mode = img.mode
            if mode not in _PNG_MODES:
                raise ValueError(f'unsupported image mode {mode!r} (use 8-bit L/RGB or 16-bit grayscale PNGs)')
            raw_mode = str(img.tile[0].args) if getattr(img, 'tile', None) else ''
            if _PNG_MODES[mode] == 8 and ';16' in raw_mode: # Pillow would keep only the high byte of each sample.
                raise ValueError(f'16-bit colour PNG ({raw_mode}): Pillow reads only the high byte of its samples; '
                    f'use 8-bit L/RGB or 16-bit grayscale PNGs')
            image = np.array(img)
    except FileNotFoundError:
        raise FileNotFoundError(f'image file not found: {fname}') from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f'cannot read image file {fname}: {err}') from None
    if mode == 'I':
        if image.size and (image.min() < 0 or image.max() > 65535):
            raise ValueError(f'cannot read image file {fname}: 32-bit values outside the 16-bit range')
        image = image.astype(np.uint16)
    if image.ndim == 2:
        image = image[:, :, None]
    return image.transpose(2, 0, 1), _PNG_MODES[mode]

#----------------------------------------------------------------------------
# Folder of PNG files (searched recursively), optional labels in dataset.json.

class ImageFolderDataset(Dataset):
    def __init__(self,
        path,                   # Path to the folder.
        use_labels  = False,    # Read labels from dataset.json in the folder.
        max_size    = None,     # Keep only the first max_size items (sorted paths), None = all.
        intensity   = None,     # Intensity normalisation, see module docstring.
    ):
        self._path = _check_path(path)
        if not os.path.isdir(self._path):
            raise ValueError(f'training.dataset.path: {self._path} is not a folder of PNG files')
        fnames = []
        for root, _dirs, files in os.walk(self._path):
            for f in files:
                if f.lower().endswith('.png'):
                    fnames.append(os.path.relpath(os.path.join(root, f), self._path).replace(os.sep, '/'))
        self._fnames = sorted(fnames)
        if not self._fnames:
            raise ValueError(f'training.dataset.path: no .png files found in {self._path}')
        self._use_labels = bool(use_labels)
        image, self._bits = read_png(self._file(0))
        raw_shape = [len(self._fnames)] + list(image.shape)
        super().__init__(name=os.path.basename(os.path.normpath(self._path)), raw_shape=raw_shape, max_size=max_size,
            intensity=intensity, default_range=(0, (1 << self._bits) - 1))
        if self._use_labels:
            self._get_labels() # Validate dataset.json now.

    def _file(self, raw_idx: int) -> str:
        return os.path.join(self._path, self._fnames[raw_idx])

    def _load_raw_image(self, raw_idx):
        fname = self._file(raw_idx)
        image, bits = read_png(fname)
        if list(image.shape) != self._raw_shape[1:] or bits != self._bits:
            raise ValueError(f'image file {fname} has shape {list(image.shape)} ({bits}-bit), but the dataset has '
                f'{self._raw_shape[1:]} ({self._bits}-bit) from {self._file(0)}; all images must match')
        return image

    def _load_raw_labels(self):
        if not self._use_labels:
            return None
        fname = os.path.join(self._path, 'dataset.json')
        if not os.path.isfile(fname):
            raise FileNotFoundError(f'training.dataset.use_labels is set but {fname} does not exist')
        try:
            with open(fname, 'r', encoding='utf-8') as f:
                table = json.load(f).get('labels')
        except (OSError, ValueError, AttributeError) as err:
            raise ValueError(f'cannot read labels from {fname}: {err}') from None
        if not isinstance(table, list):
            raise ValueError(f'{fname}: "labels" must be a list of [relative/path.png, label] pairs')
        try:
            table = {str(k).replace('\\', '/'): v for k, v in table}
        except (TypeError, ValueError):
            raise ValueError(f'{fname}: "labels" must be a list of [relative/path.png, label] pairs') from None
        missing = [f for f in self._fnames if f not in table]
        if missing:
            raise ValueError(f'{fname}: no label for image {missing[0]} ({len(missing)} images without labels)')
        values = [table[f] for f in self._fnames]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            return _labels_to_float(np.array(values, dtype=np.int64), fname)
        if all(isinstance(v, list) for v in values) and len({len(v) for v in values}) == 1:
            try:
                return _labels_to_float(np.array(values, dtype=np.float64), fname)
            except (TypeError, ValueError) as err:
                raise ValueError(f'{fname}: label vectors must be numbers ({err})') from None
        raise ValueError(f'{fname}: labels must be all integers (classes) or all lists of the same length (vectors)')

#----------------------------------------------------------------------------
# NIfTI volumes (.nii / .nii.gz): a folder (sorted, searched recursively) or a
# list of files, with optional condition volumes and masks matched by
# position. Each volume is centre-cropped / padded (with `pad_value`, in raw
# units) to `shape` along the NIfTI array axes i, j, k, which become the
# tensor's (D, H, W); a 4-D file's 4th axis gives the channels. The item's
# `affine` is the file's affine moved to the crop: A' = A T(o), with o the
# voxel offset of the crop (negative for padding). Masks are binarised (> 0).

_NIFTI_SUFFIXES = ('.nii', '.nii.gz')

def _nifti_files(spec, key: str) -> list[str]:
    if isinstance(spec, (str, os.PathLike)):
        path = os.fspath(spec)
        if not os.path.exists(path):
            raise FileNotFoundError(f'training.dataset.{key}: {path} not found')
        if not os.path.isdir(path):
            return [path]
        files = sorted(os.path.join(root, f) for root, _dirs, names in os.walk(path) for f in names if f.lower().endswith(_NIFTI_SUFFIXES))
        if not files:
            raise ValueError(f'training.dataset.{key}: no .nii / .nii.gz files in {path}')
        return files
    if isinstance(spec, collections.abc.Sequence) and spec and all(isinstance(f, (str, os.PathLike)) for f in spec):
        files = [os.fspath(f) for f in spec]
        for f in files:
            if not os.path.isfile(f):
                raise FileNotFoundError(f'training.dataset.{key}: {f} not found')
        return files
    raise ValueError(f'training.dataset.{key}: expected a folder, a file or a list of .nii / .nii.gz files, got {spec!r}')

def read_nifti(fname: str) -> tuple[np.ndarray, np.ndarray]:
    """(data (C, i, j, k) float32, affine (4, 4) float64) of a 3-D or 4-D NIfTI file; ValueError naming the file."""
    import nibabel as nib
    try:
        img = nib.load(fname)
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as err: # pylint: disable=broad-except # nibabel raises many kinds.
        raise ValueError(f'cannot read NIfTI file {fname}: {err}') from None
    if data.ndim == 3:
        data = data[None]
    elif data.ndim == 4:
        data = np.moveaxis(data, 3, 0)
    else:
        raise ValueError(f'NIfTI file {fname}: expected a 3-D volume (or 4-D with channels last), got shape {data.shape}')
    if not np.isfinite(data).all():
        raise ValueError(f'NIfTI file {fname}: the volume contains NaN or Inf')
    return np.ascontiguousarray(data), np.asarray(img.affine, dtype=np.float64)

def crop_or_pad(data: np.ndarray, shape, pad_value: float = 0) -> tuple[np.ndarray, np.ndarray]:
    """Centre-crop / pad (C, *spatial) to `shape`; returns the result and the voxel offset o (new i = old i - o)."""
    offset = np.array([(n - t) // 2 if n >= t else -((t - n) // 2) for n, t in zip(data.shape[1:], shape)], dtype=np.int64)
    out = np.full([data.shape[0], *shape], pad_value, dtype=data.dtype)
    src = tuple(slice(max(o, 0), max(o, 0) + min(n, t)) for o, n, t in zip(offset, data.shape[1:], shape))
    dst = tuple(slice(max(-o, 0), max(-o, 0) + min(n, t)) for o, n, t in zip(offset, data.shape[1:], shape))
    out[(slice(None), *dst)] = data[(slice(None), *src)]
    return out, offset

class NiftiVolumeDataset(Dataset):
    def __init__(self,
        path,                   # Folder of .nii / .nii.gz files or a list of files.
        cond_path   = None,     # Condition volumes (folder or list, same order and size as the images); None = none.
        mask_path   = None,     # Masks (folder or list, same order and size); None = none.
        shape       = None,     # [D, H, W] to crop / pad to (NIfTI axes i, j, k); None = the first volume's size.
        pad_value   = 0,        # Value of padded voxels before the intensity normalisation.
        max_size    = None,     # Keep only the first max_size items, None = all.
        intensity   = None,     # Intensity normalisation of images and conditions, see module docstring.
    ):
        self._files = _nifti_files(path, 'path')
        self._extra = {}
        for key, spec in (('cond', cond_path), ('mask', mask_path)):
            if spec is None:
                continue
            files = _nifti_files(spec, f'{key}_path')
            if len(files) != len(self._files):
                raise ValueError(f'training.dataset.{key}_path: {len(files)} files for {len(self._files)} images')
            self._extra[key] = files
        first, _ = read_nifti(self._files[0])
        if shape is None:
            shape = list(first.shape[1:])
        if not (isinstance(shape, collections.abc.Sequence) and len(shape) == 3 and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in shape)):
            raise ValueError(f'training.dataset.shape must be [D, H, W] (three positive ints) or null, got {shape!r}')
        self._shape = [int(v) for v in shape]
        if isinstance(pad_value, bool) or not isinstance(pad_value, (int, float)) or not np.isfinite(pad_value):
            raise ValueError(f'training.dataset.pad_value must be a finite number, got {pad_value!r}')
        self._pad_value = float(pad_value)
        self._channels = {'image': first.shape[0]}
        for key, files in self._extra.items():
            self._channels[key] = read_nifti(files[0])[0].shape[0]
        name = os.path.basename(os.path.normpath(path)) if isinstance(path, (str, os.PathLike)) else 'nifti'
        super().__init__(name=name, raw_shape=[len(self._files), first.shape[0], *self._shape], max_size=max_size, intensity=intensity)

    def _load(self, key: str, raw_idx: int) -> tuple[np.ndarray, np.ndarray]:
        fname = (self._files if key == 'image' else self._extra[key])[raw_idx]
        data, affine = read_nifti(fname)
        if data.shape[0] != self._channels[key]:
            raise ValueError(f'NIfTI file {fname} has {data.shape[0]} channel(s), the dataset\'s first {key} has {self._channels[key]}')
        return data, affine

    def _load_raw_image(self, raw_idx):
        raw, affine = self._load('image', raw_idx)
        data, offset = crop_or_pad(raw, self._shape, self._pad_value)
        self._last = (raw_idx, list(raw.shape[1:]), affine, offset) # Geometry of this item, for __getitem__.
        return data

    def __getitem__(self, idx: int) -> dict:
        item = super().__getitem__(idx)
        raw_idx, raw_size, affine, offset = self._last
        assert raw_idx == item['idx']
        shift = np.eye(4)
        shift[:3, 3] = offset
        item['affine'] = affine @ shift
        for key in self._extra:
            data, _ = self._load(key, item['idx'])
            if list(data.shape[1:]) != raw_size:
                raise ValueError(f'NIfTI file {self._extra[key][item["idx"]]} has size {list(data.shape[1:])}, '
                    f'its image {self._files[item["idx"]]} {raw_size}')
            data, _ = crop_or_pad(data, self._shape, self._pad_value if key == 'cond' else 0)
            item[key] = self._norm(data) if key == 'cond' else (data > 0).astype(np.float32)
        return item

    @property
    def cond_channels(self) -> int:
        return self._channels.get('cond', 0) if 'cond' in self._extra else 0

#----------------------------------------------------------------------------
