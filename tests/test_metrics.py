# medEDM: PSNR, SSIM, NRMSE against direct formulas and their defining properties.

import math

import numpy as np
import pytest
import torch

from training import metrics

def _naive_ssim(x, y, L):
    # Direct loops over window positions (Wang et al. 2004, Eq. 13, Gaussian window 11, sigma 1.5).
    w = metrics.gaussian_window().numpy()
    C1, C2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    vals = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            a, b = x[i:i + 11, j:j + 11], y[i:i + 11, j:j + 11]
            ma, mb = (w * a).sum(), (w * b).sum()
            va, vb = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum()
            cov = (w * (a - ma) * (b - mb)).sum()
            vals.append((2 * ma * mb + C1) * (2 * cov + C2) / ((ma ** 2 + mb ** 2 + C1) * (va + vb + C2)))
    return np.mean(vals)

def test_ssim_matches_direct_formula():
    rng = np.random.default_rng(0)
    x = rng.random((24, 20))
    y = x + 0.1 * rng.standard_normal((24, 20))
    assert metrics.ssim(y, x, data_range=1.0)[0] == pytest.approx(_naive_ssim(y, x, 1.0), rel=1e-10)

def test_ssim_properties():
    rng = np.random.default_rng(1)
    x = rng.random((3, 32, 32))
    assert np.allclose(metrics.ssim(x, x, data_range=1.0), 1.0)
    noisy = [metrics.ssim(x + s * rng.standard_normal(x.shape), x, data_range=1.0).mean() for s in (0.01, 0.1, 0.5)]
    assert noisy[0] > noisy[1] > noisy[2]
    y = x + 0.2 * rng.standard_normal(x.shape)
    assert np.allclose(metrics.ssim(x, y, data_range=1.0), metrics.ssim(y, x, data_range=1.0)) # Symmetric.

def test_psnr_and_nrmse_golden():
    ref = np.ones((1, 8, 8))
    x = ref + 0.1
    assert metrics.psnr(x, ref, data_range=1.0)[0] == pytest.approx(20.0)
    assert metrics.nrmse(x, ref)[0] == pytest.approx(0.1)
    assert metrics.psnr(x, ref, data_range=2.0)[0] == pytest.approx(20.0 + 20 * np.log10(2))
    assert metrics.psnr(x, ref, data_range=np.int64(2))[0] == pytest.approx(20.0 + 20 * np.log10(2)) # numpy numbers too.

@pytest.mark.parametrize('call, message', [
    (lambda: metrics.psnr(np.ones((4, 4)), np.ones((5, 4)), 1.0), 'does not match reference shape'),
    (lambda: metrics.psnr(np.ones((4, 4)), np.ones((4, 4)), 0), 'data_range must be a positive number, got 0'),
    (lambda: metrics.psnr(np.ones((4, 4)), np.ones((4, 4)), True), 'data_range must be a positive number, got True'),
    (lambda: metrics.ssim(np.ones((8, 8)), np.ones((8, 8)), 1.0), 'smaller than the SSIM window'),
])
def test_metric_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()

#----------------------------------------------------------------------------
# write_metrics: JSON + CSV round trip, non-finite floats as strings, numpy values plain.

def test_write_metrics_round_trip(tmp_path):
    import csv
    import json
    import os
    summary = dict(images=np.int64(2), sigma=np.float32(0.5), best=float('nan'), scores={'0.5': float('inf'), '1.0': -float('inf')},
        shape=np.array([1, 16, 16]), sampler=dict(solver='heun', S_max=float('inf')))
    rows = [dict(image=0, method='a', psnr=np.float64(20.5)), dict(image=1, method='a', psnr=float('nan'))]
    json_path, csv_path = metrics.write_metrics(str(tmp_path), summary, rows)
    assert (json_path, csv_path) == (str(tmp_path / 'metrics.json'), str(tmp_path / 'metrics.csv'))
    assert json.loads(open(json_path).read(), parse_constant=lambda c: pytest.fail(f'non-standard JSON constant {c}')) == dict(
        images=2, sigma=0.5, best='nan', scores={'0.5': 'inf', '1.0': '-inf'}, shape=[1, 16, 16], sampler=dict(solver='heun', S_max='inf'))
    assert list(csv.DictReader(open(csv_path))) == [dict(image='0', method='a', psnr='20.5'), dict(image='1', method='a', psnr='nan')]
    assert sorted(os.listdir(tmp_path)) == ['metrics.csv', 'metrics.json'] # No temporary files left.
    with pytest.raises(ValueError, match=r"write_metrics: row 1 has columns \['image', 'psnr'\], the first row \['image', 'method', 'psnr'\]"):
        metrics.write_metrics(str(tmp_path / 'x'), {}, [rows[0], dict(image=1, psnr=1.0)])

#----------------------------------------------------------------------------
# Region metrics (mask) and the calibration of a posterior.

def test_masked_metrics_equal_the_metrics_of_the_region():
    gen = torch.Generator().manual_seed(0)
    x, ref = torch.rand(2, 1, 16, 16, generator=gen, dtype=torch.float64), torch.rand(2, 1, 16, 16, generator=gen, dtype=torch.float64)
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[2:9, 3:14] = True
    region = lambda t: t[..., 2:9, 3:14]
    np.testing.assert_allclose(metrics.psnr(x, ref, 1.0, mask=mask), metrics.psnr(region(x), region(ref), 1.0), rtol=1e-13)
    np.testing.assert_allclose(metrics.nrmse(x, ref, mask=mask), metrics.nrmse(region(x), region(ref)), rtol=1e-13)
    ones = torch.ones(16, 16, dtype=torch.bool)
    np.testing.assert_array_equal(metrics.ssim(x, ref, 1.0, mask=ones), metrics.ssim(x, ref, 1.0))
    centre = torch.zeros(16, 16, dtype=torch.bool)
    centre[5, 5] = centre[6, 7] = True                                      # SSIM: the mean over those two window centres.
    full_map_x = metrics.ssim(x[..., 0:11, 0:11], ref[..., 0:11, 0:11], 1.0), metrics.ssim(x[..., 1:12, 2:13], ref[..., 1:12, 2:13], 1.0)
    np.testing.assert_allclose(metrics.ssim(x, ref, 1.0, mask=centre), (full_map_x[0] + full_map_x[1]) / 2, rtol=1e-13)
    with pytest.raises(ValueError, match='metrics: the mask is empty for at least one image'):
        metrics.psnr(x, ref, 1.0, mask=torch.zeros(16, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match='metrics: the mask has no pixel at least 5 pixels inside the image border'):
        metrics.ssim(x, ref, 1.0, mask=torch.eye(16, dtype=torch.bool).flip(0) & (torch.arange(16) < 2)[:, None])

def test_calibration_known_answers():
    ref = torch.zeros(1, 1, 2, 4, dtype=torch.float64)
    std = torch.ones_like(ref)
    mean = torch.tensor([0.5, -1.5, 2.5, -0.5, 0.2, 1.0, -3.0, 1.9], dtype=torch.float64).reshape(ref.shape)
    cal = metrics.calibration(mean, std, ref)
    assert cal['coverage_1sigma'] == 4 / 8 and cal['coverage_2sigma'] == 6 / 8   # |err| <= 1: 0.5, 0.5, 0.2, 1.0; <= 2: + 1.5, 1.9.
    assert math.isnan(cal['std_error_correlation'])                         # A constant std predicts nothing.
    gen = torch.Generator().manual_seed(1)
    sd = 0.1 + torch.rand(1, 1, 200, 200, generator=gen, dtype=torch.float64)
    mean = sd * torch.randn(sd.shape, generator=gen, dtype=torch.float64)   # Errors drawn with exactly that std.
    cal = metrics.calibration(mean, sd, torch.zeros_like(sd))
    assert abs(cal['coverage_1sigma'] - 0.6827) < 0.005 and abs(cal['coverage_2sigma'] - 0.9545) < 0.003
    assert 0.3 < cal['std_error_correlation'] < 0.6                         # |N(0, s^2)| grows with s.
    assert metrics.calibration(mean, sd * 1e-3, torch.zeros_like(sd))['coverage_2sigma'] < 0.01

def test_expected_coverage_of_a_calibrated_posterior_with_few_samples():
    assert abs(metrics.expected_coverage(1) - 0.682689) < 1e-6 and abs(metrics.expected_coverage(2) - 0.954500) < 1e-6
    assert abs(metrics.expected_coverage(1, 8) - 0.5930) < 5e-4 and abs(metrics.expected_coverage(2, 8) - 0.8790) < 5e-4
    assert abs(metrics.expected_coverage(1, 10**6) - metrics.expected_coverage(1)) < 1e-5
    gen = np.random.default_rng(0)                                          # Simulated: ref and 8 draws from one Gaussian.
    draws, ref = gen.standard_normal((8, 1, 1, 100, 100)) * 0.7, gen.standard_normal((1, 1, 100, 100)) * 0.7
    cal = metrics.calibration(draws.mean(0), draws.std(0), ref, samples=8)
    assert abs(cal['coverage_1sigma'] - cal['calibrated_coverage_1sigma']) < 0.015
    assert abs(cal['coverage_2sigma'] - cal['calibrated_coverage_2sigma']) < 0.01
