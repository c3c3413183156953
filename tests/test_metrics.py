# medEDM: PSNR, SSIM, NRMSE against direct formulas and their defining properties.

import numpy as np
import pytest

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
