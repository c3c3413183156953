# medEDM: diffusion-model training toolkit for medical imaging.

"""Writing images as PNG files (8 or 16 bit), single or as a grid (volumes
as the mid-slices of their three planes).

Images are float arrays (C, H, W) in the range `drange` (default [-1, 1],
the range of the datasets). The 8-bit encoding is EDM's: for [-1, 1] a value
x becomes clip(x * 127.5 + 128, 0, 255) truncated to uint8; 16 bit uses the
same rounding on [0, 65535] (PNG mode I;16), so a 16-bit PNG written here
and read back by `training.dataset.ImageFolderDataset` returns the values to
within 1/32767.5. One channel is written as grayscale, three as RGB (8 bit
only); any other channel count (and three channels at 16 bit) is written as
grayscale panels side by side, channel 0 on the left. Files are written
atomically.
"""

import os

import numpy as np
from PIL import Image

from torch_utils import persistence

#----------------------------------------------------------------------------
# Accept numpy arrays and torch tensors alike.

def _to_numpy(x) -> np.ndarray:
    if hasattr(x, 'detach'):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)

#----------------------------------------------------------------------------
# Quantise (C, H, W) floats to uint8/uint16 and lay out channels for PIL.

def _encode(image_chw: np.ndarray, bits: int, drange) -> Image.Image:
    if bits not in (8, 16):
        raise ValueError(f'bits must be 8 or 16, got {bits!r}')
    lo, hi = float(drange[0]), float(drange[1])
    if not hi > lo:
        raise ValueError(f'drange must be (low, high) with low < high, got {tuple(drange)!r}')
    if image_chw.ndim != 3:
        raise ValueError(f'expected an image of shape (C, H, W), got shape {tuple(image_chw.shape)}')
    C, H, W = image_chw.shape
    maxval = (1 << bits) - 1
    x = (image_chw.astype(np.float64) - lo) * (maxval / (hi - lo)) + 0.5
    x = np.nan_to_num(x, nan=0.0)
    x = np.clip(x, 0, maxval).astype(np.uint8 if bits == 8 else np.uint16)
    if C == 3 and bits == 8:
        return Image.fromarray(np.ascontiguousarray(x.transpose(1, 2, 0))) # Mode RGB.
    x = x.transpose(1, 0, 2).reshape(H, C * W) # Channels side by side.
    return Image.fromarray(np.ascontiguousarray(x)) # Mode L (uint8) or I;16 (uint16).

#----------------------------------------------------------------------------
# Write a PIL image atomically.

def _write(img: Image.Image, path: str | os.PathLike) -> None:
    persistence.atomic_write(path, lambda f: img.save(f, format='PNG'))

#----------------------------------------------------------------------------
# Save one image (C, H, W) as PNG.

def save_png(image_chw, path: str | os.PathLike, bits: int = 8, drange=(-1, 1)) -> None:
    """Save a float image (C, H, W) (numpy or torch) in `drange` as an 8- or
    16-bit PNG; see the module docstring for the channel layout."""
    _write(_encode(_to_numpy(image_chw), bits, drange), path)

#----------------------------------------------------------------------------
# Near-square grid size (gw, gh) for n images.

def auto_grid_size(n: int) -> tuple[int, int]:
    gw = max(int(np.ceil(np.sqrt(n))), 1)
    return gw, max(int(np.ceil(n / gw)), 1)

#----------------------------------------------------------------------------
# Volumes (N, C, D, H, W) as images: the mid-slices of the three planes side
# by side, x[:, :, D//2] (H x W), x[:, :, :, H//2] (D x W), x[..., W//2]
# (D x H), each placed top-left in an S x S tile (S = max(D, H, W)) filled
# with `fill` elsewhere: (N, C, S, 3 S).

def volume_mid_slices(volumes, fill: float = -1) -> np.ndarray:
    volumes = _to_numpy(volumes)
    if volumes.ndim != 5:
        raise ValueError(f'expected volumes of shape (N, C, D, H, W), got shape {tuple(volumes.shape)}')
    N, C, D, H, W = volumes.shape
    S = max(D, H, W)
    out = np.full([N, C, S, 3 * S], fill, dtype=np.float32)
    for i, plane in enumerate((volumes[:, :, D // 2], volumes[:, :, :, H // 2], volumes[:, :, :, :, W // 2])):
        out[:, :, :plane.shape[2], i * S:i * S + plane.shape[3]] = plane
    return out

#----------------------------------------------------------------------------
# Save a batch (N, C, H, W) as one PNG grid, row-major, gw images per row;
# volumes (N, C, D, H, W) show their three mid-slices (volume_mid_slices).

def save_image_grid(images, path: str | os.PathLike, drange=(-1, 1), grid_size: tuple[int, int] | None = None, bits: int = 8) -> None:
    """Save N images (N, C, H, W) as a gw x gh grid (row-major; empty cells
    are filled with drange[0]). `grid_size=None` picks a near-square grid.
    The PNG is (gh*H) x (gw*W) for C in {1, 3} (C*gw*W wide otherwise)."""
    images = _to_numpy(images)
    if images.ndim == 5:
        images = volume_mid_slices(images, fill=float(drange[0]))
    if images.ndim != 4:
        raise ValueError(f'expected images of shape (N, C, H, W) or volumes (N, C, D, H, W), got shape {tuple(images.shape)}')
    N, C, H, W = images.shape
    gw, gh = auto_grid_size(N) if grid_size is None else (int(grid_size[0]), int(grid_size[1]))
    if gw < 1 or gh < 1 or gw * gh < N:
        raise ValueError(f'grid_size {(gw, gh)} cannot hold {N} images')
    if not (C == 1 or (C == 3 and bits == 8)): # Panels per image, then grid.
        images = images.transpose(0, 2, 1, 3).reshape(N, 1, H, C * W)
        C, W = 1, C * W
    grid = np.full([gw * gh, C, H, W], float(drange[0]), dtype=np.float32)
    grid[:N] = images
    grid = grid.reshape(gh, gw, C, H, W).transpose(2, 0, 3, 1, 4).reshape(C, gh * H, gw * W)
    _write(_encode(grid, bits, drange), path)

#----------------------------------------------------------------------------
