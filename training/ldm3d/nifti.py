# medEDM: diffusion-model training toolkit for medical imaging.

"""NIfTI output of the inpainting: float32 volumes on the input's grid, with
the input's header (qform and sform with their codes, voxel sizes, units,
orientation, whatever it is: RAS, LPS or oblique); only the data type
becomes float32 and the scaling is dropped. Written atomically."""

import gzip

import numpy as np

from torch_utils import persistence

def write_like(path: str, data: np.ndarray, ref_img) -> None:
    """Write `data` (i, j, k) as a float32 .nii.gz with the header of the nibabel image `ref_img`."""
    import nibabel as nib
    data = np.asarray(data, dtype=np.float32)
    if tuple(data.shape) != tuple(ref_img.shape[:3]):
        raise ValueError(f'write_like: data {data.shape} does not match the reference grid {ref_img.shape} for {path}')
    header = ref_img.header.copy()
    header.set_data_dtype(np.float32)
    header.set_data_shape(data.shape)
    img = nib.Nifti1Image(data, None, header=header) # affine=None: the header's qform / sform stay as they are.
    img.header.set_slope_inter(None, None)
    payload = img.to_bytes()
    persistence.atomic_write_bytes(path, gzip.compress(payload, mtime=0) if path.endswith('.gz') else payload)
