# medEDM: evaluation of the 3-D LDM inpainting (training/ldm3d/evaluation.py,
# nifti.py): the official BraTS 2023 metrics on hand-made volumes and known
# answers, the baselines, NIfTI output with the input's header (non-RAS).

import os

import nibabel as nib
import numpy as np
import pytest

from training.ldm3d import evaluation as ldm_eval
from training.ldm3d import latent as ldm_latent
from training.ldm3d import nifti

#----------------------------------------------------------------------------
# Hand-made volumes: a smooth positive "brain" in a 14^3 grid, a cubic mask.

def _volumes(seed=0):
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:14, :14, :14].astype(np.float32)
    t1n = (100 + 40 * np.sin(x / 3) * np.cos(y / 4) + 10 * z + rng.uniform(0, 5, x.shape)).astype(np.float32)
    t1n[0] = 0 # Some background.
    mask = np.zeros(t1n.shape, dtype=bool)
    mask[4:9, 5:10, 3:8] = True
    voided = np.where(mask, 0, t1n).astype(np.float32)
    return t1n, voided, mask

def _write(folder, **volumes):
    paths = {}
    for name, v in volumes.items():
        paths[name] = os.path.join(folder, f'{name}.nii.gz')
        nib.save(nib.Nifti1Image(np.asarray(v, dtype=np.float32), np.diag([1.0, 1.0, 1.0, 1.0])), paths[name])
    return paths

def test_metrics_equal_the_official_package_on_hand_made_volumes(tmp_path):
    from inpainting import challenge_metrics_2023 as cm
    t1n, voided, mask = _volumes()
    rng = np.random.default_rng(1)
    pred = np.where(mask, t1n + rng.normal(0, 8, t1n.shape), voided)
    p = _write(str(tmp_path), pred=pred, mask=mask, t1n=t1n, voided=voided)
    ours = ldm_eval.official_metrics(p['pred'], p['mask'], p['t1n'], p['voided'])
    theirs = cm.compute_image_quality_metrics(prediction=p['pred'], healthy_mask=p['mask'], reference_t1=p['t1n'], voided_t1=p['voided'])
    assert ours == theirs
    assert 0 < ours['ssim'] < 1 and ours['mse'] > 0

def _normalise(x, voided):
    lo, hi = np.percentile(voided, [0.5, 99.5])
    lo = max(lo, 0)
    return (np.clip(x, lo, hi) - lo) / (hi - lo)

def test_known_answers_perfect_and_constant_fill(tmp_path):
    t1n, voided, mask = _volumes()
    p = _write(str(tmp_path), perfect=t1n, mask=mask, t1n=t1n, voided=voided)
    perfect = ldm_eval.official_metrics(p['perfect'], p['mask'], p['t1n'], p['voided'])
    assert perfect['mse'] == 0 and perfect['mae'] == 0 and perfect['psnr'] == float('inf')
    assert perfect['ssim'] == pytest.approx(1.0, abs=1e-6)

    c = 120.0 # Constant fill: MSE and PSNR inside the mask by hand (percentile normalisation by the voided image).
    const = np.where(mask, c, voided)
    p = _write(str(tmp_path), const=const, mask=mask, t1n=t1n, voided=voided)
    got = ldm_eval.official_metrics(p['const'], p['mask'], p['t1n'], p['voided'])
    gt = _normalise(t1n * mask, voided)[mask].astype(np.float64)
    pr = _normalise(const * mask, voided)[mask].astype(np.float64)
    mse = np.mean((gt - pr) ** 2)
    assert got['mse'] == pytest.approx(mse, rel=1e-5)
    assert got['mae'] == pytest.approx(np.mean(np.abs(gt - pr)), rel=1e-5)
    assert got['psnr'] == pytest.approx(10 * np.log10((gt.max() - gt.min()) ** 2 / mse), rel=1e-5)
    assert got['psnr_01'] == pytest.approx(10 * np.log10(1 / mse), rel=1e-5)
    assert got['ssim'] < perfect['ssim']

#----------------------------------------------------------------------------
# Baselines.

def test_mean_fill_and_diffusion_fill():
    t1n, voided, mask = _volumes()
    m = ldm_eval.mean_fill(voided, mask)
    assert np.array_equal(m[~mask], voided[~mask])
    assert np.allclose(m[mask], voided[(voided != 0) & ~mask].mean())
    # A linear function is harmonic: the diffusion fill reproduces it inside the mask from its border values.
    z, y, x = np.mgrid[:14, :14, :14].astype(np.float64)
    lin = (50 + 2 * x - 3 * y + 1.5 * z).astype(np.float32)
    d = ldm_eval.diffusion_fill(np.where(mask, 0, lin).astype(np.float32), mask)
    assert np.array_equal(d[~mask], lin[~mask])
    assert np.allclose(d[mask], lin[mask], atol=1e-3)
    # A non-harmonic fill inside is smooth: bounded by the border values (maximum principle).
    d = ldm_eval.diffusion_fill(voided, mask)
    border = voided[np.roll(mask, 1, 0) & ~mask]
    assert d[mask].min() >= voided[~mask & (voided > 0)].min() - 1e-3 and d[mask].max() <= voided.max() + 1e-3 and border.size

def test_paste_keeps_every_voxel_outside_the_mask():
    t1n, voided, mask = _volumes()
    out = ldm_latent.paste(voided, mask, np.full(voided.shape, np.nan, dtype=np.float32))
    assert np.array_equal(out[~mask], voided[~mask]) and np.isnan(out[mask]).all()

#----------------------------------------------------------------------------
# NIfTI output keeps the input's header: an oblique, anisotropic LPS input.

def test_nifti_output_keeps_a_non_ras_header(tmp_path):
    t1n, voided, mask = _volumes()
    theta = np.deg2rad(10)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = np.diag([-1.2, -0.9, 2.5]) @ rot # LPS-ish, oblique, anisotropic.
    affine[:3, 3] = [90, 120, -70]
    src = nib.Nifti1Image(voided.astype(np.int16), affine)
    src.set_qform(affine, code=1)
    src.set_sform(affine, code=2)
    src.header.set_xyzt_units('mm')
    path = str(tmp_path / 'in.nii.gz')
    nib.save(src, path)
    ref = nib.load(path)
    assert nib.aff2axcodes(ref.affine) != ('R', 'A', 'S')
    out_path = str(tmp_path / 'out.nii.gz')
    data = ldm_latent.paste(np.asarray(ref.dataobj, dtype=np.float32), mask, np.full(mask.shape, 7.5, dtype=np.float32))
    nifti.write_like(out_path, data, ref)
    out = nib.load(out_path)
    assert out.get_data_dtype() == np.float32
    assert np.array_equal(out.affine, ref.affine) and nib.aff2axcodes(out.affine) == nib.aff2axcodes(ref.affine)
    assert np.array_equal(out.header.get_qform(), ref.header.get_qform()) and np.array_equal(out.header.get_sform(), ref.header.get_sform())
    assert (int(out.header['qform_code']), int(out.header['sform_code'])) == (1, 2)
    assert out.header.get_zooms() == ref.header.get_zooms() and out.header.get_xyzt_units() == ('mm', 'unknown')
    back = np.asarray(out.dataobj)
    assert np.array_equal(back[~mask], np.asarray(ref.dataobj)[~mask]) and np.all(back[mask] == 7.5)
