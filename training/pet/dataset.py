# medEDM: diffusion-model training toolkit for medical imaging.

"""PET dose enhancement data: full-dose MLEM reconstructions as images and
low-dose MLEM reconstructions as conditions (conditional EDM).

The npz (`dataset_tool.py pet-data`) holds `phantoms` [N,1,R,R] (activity)
and, for precomputed pairs, `full` and `low` [N,1,R,R]: reconstructions in
full-dose counts per pixel (tomography_utils.dose). With `simulate=True` the
noise is redrawn at every step instead (the stored pairs, where the npz has
them, still give the items' `image` and `cond`, e.g. generate.py's conditions), and
`device_transform` (called by the training loop on the training device, under
the loop's per-step seeding) simulates both acquisitions and reconstructs them
with one batched MLEM.

Intensity normalisation (both channels, per image): x_n = x / s - 1 with
s = q_99.5(low) / 2, a scale taken from the CONDITION, so it is known at
test time and a posterior sample maps back to counts per pixel as
(x_n + 1) * s. `scale` travels with every item. (The reference normalised each
reconstruction by its own maximum, which the target's is unknown at test time.)"""

import zipfile

import numpy as np
import torch

from training.dataset import Dataset, _check_path

#----------------------------------------------------------------------------
# Normalisation shared by training, generation and evaluation.

def pet_scale(low: torch.Tensor) -> torch.Tensor:
    """Per-image scale s [B] from low-dose reconstructions [B, ...]."""
    flat = low.reshape(low.shape[0], -1).to(torch.float32)
    return (torch.quantile(flat, 0.995, dim=1) / 2).clamp_min(1e-6)

def pet_normalize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x / scale.reshape(-1, *[1] * (x.ndim - 1)) - 1

def pet_denormalize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x + 1) * scale.reshape(-1, *[1] * (x.ndim - 1))

#----------------------------------------------------------------------------

class PETDataset(Dataset):
    def __init__(self,
        path,                       # npz from `dataset_tool.py pet-data`.
        simulate        = False,    # Redraw the noise every step (on the training device); stored `full`/`low`, if any, still fill the items (generate.py).
        total_counts    = 1e6,      # simulate: expected full-dose counts per image.
        dose_fraction   = 0.25,     # simulate: low dose / full dose.
        n_iter          = 50,       # simulate: MLEM iterations.
        cache_dir       = 'projector_matrices', # simulate: projector cache folder.
        max_size        = None,     # Keep only the first max_size items, None = all.
    ):
        self._path = _check_path(path)
        needed = ['phantoms'] + ([] if simulate else ['full', 'low'])
        if not zipfile.is_zipfile(self._path): # A text file, a .npy, a truncated archive.
            raise ValueError(f'training.dataset.path: {self._path} is not an .npz archive (or it is truncated); build it with dataset_tool.py pet-data')
        try:
            with np.load(self._path, allow_pickle=False) as npz:
                arrays = {k: npz[k].astype(np.float32) for k in ('phantoms', 'full', 'low') if k in npz.files} # Pairs too with simulate: generate.py's conditions.
        except Exception as err: # pylint: disable=broad-except # Bad CRC, damaged members: never a traceback.
            raise ValueError(f'cannot read dataset file {self._path}: damaged archive ({type(err).__name__}: {err})') from None
        missing = [k for k in needed if k not in arrays]
        if missing:
            raise ValueError(f'training.dataset.path: {self._path} lacks arrays {missing} '
                f'(build it with dataset_tool.py pet-data{"" if simulate else "; or set training.dataset.simulate=true"})')
        self._phantoms, self._full, self._low = arrays['phantoms'], arrays.get('full'), arrays.get('low')
        if self._phantoms.ndim != 4 or self._phantoms.shape[1] != 1:
            raise ValueError(f'training.dataset.path: phantoms in {self._path} must be [N, 1, R, R], got {self._phantoms.shape}')
        for name, arr in (('full', self._full), ('low', self._low)):
            if arr is not None and arr.shape != self._phantoms.shape:
                raise ValueError(f'training.dataset.path: {name} {arr.shape} does not match phantoms {self._phantoms.shape} in {self._path}')
        self.simulate = bool(simulate)
        self.total_counts = float(total_counts)
        self.dose_fraction = float(dose_fraction)
        self.n_iter = int(n_iter)
        self.cache_dir = cache_dir
        self._system_matrix = None
        super().__init__(name='pet-' + str(self._phantoms.shape[-1]), raw_shape=self._phantoms.shape, max_size=max_size)

    cond_channels = 1

    def __getitem__(self, idx: int) -> dict:
        idx = int(idx)
        idx = idx + len(self) if idx < 0 else idx # Python's negative indices, as the other datasets.
        if not 0 <= idx < len(self):
            raise IndexError(f'dataset index {idx} out of range for {len(self)} items')
        item = dict(phantom=self._phantoms[idx], idx=idx)
        if self._full is not None and self._low is not None: # With simulate, device_transform replaces them in training.
            full, low = torch.from_numpy(self._full[idx]), torch.from_numpy(self._low[idx])
            scale = pet_scale(low[None])
            item.update(image=pet_normalize(full[None], scale)[0].numpy(), cond=pet_normalize(low[None], scale)[0].numpy(),
                scale=np.float32(scale[0]))
        return item

    def system_matrix(self, device: torch.device):
        """The projector of this dataset's geometry (cached on disk and in memory)."""
        from tomography_utils.projector import get_system_matrix
        if self._system_matrix is None or self._system_matrix.device != torch.device(device):
            self._system_matrix = get_system_matrix(self.resolution, cache_dir=self.cache_dir, device=device)
        return self._system_matrix

    def device_transform(self, batch: dict) -> dict:
        """simulate=True: full/low-dose acquisitions + batched MLEM on the batch's device."""
        if not self.simulate:
            return batch
        from tomography_utils.dose import simulate_dose
        phantoms = batch['phantom']
        gen = torch.Generator(phantoms.device).manual_seed(int(torch.randint(1 << 62, [])))
        full, low, _, _ = simulate_dose(phantoms[:, 0], self.system_matrix(phantoms.device), total_counts=self.total_counts,
            dose_fraction=self.dose_fraction, n_iter=self.n_iter, generator=gen)
        scale = pet_scale(low)
        return dict(batch, image=pet_normalize(full, scale)[:, None], cond=pet_normalize(low, scale)[:, None], scale=scale)

#----------------------------------------------------------------------------
