# medEDM: the ODE/SDE solvers and time discretisations against closed forms.
#
# For Gaussian data N(0, s^2 I) the ideal denoiser is D(x; sigma) = s^2/(s^2+sigma^2) x
# and the probability-flow ODE dx/dsigma = (x - D)/sigma has the solution
# x(sigma) = x(sigma_max) sqrt((s^2 + sigma^2) / (s^2 + sigma_max^2)).

import numpy as np
import pytest
import torch

from training import networks
from training import sampling
from training import solvers

S_DATA = 0.5
SIGMA_MIN, SIGMA_MAX = 0.002, 80

def gaussian_denoiser(x, sigma):
    return S_DATA ** 2 / (S_DATA ** 2 + sigma ** 2) * x

def exact(x_start, sigma_start, sigma):
    return x_start * np.sqrt((S_DATA ** 2 + sigma ** 2) / (S_DATA ** 2 + sigma_start ** 2))

def _x_start(n=256, seed=0, sigma_max=SIGMA_MAX):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dtype=torch.float64, generator=g) * np.sqrt(sigma_max ** 2 + S_DATA ** 2)

def _solve(solver, levels, discretization='edm', sigma_max=SIGMA_MAX, **kwargs):
    # ODE from sigma_max to sigma_min (no final jump to 0): the asymptotic order shows cleanly.
    sigmas = sampling.sigma_steps(levels, SIGMA_MIN, sigma_max, discretization)[:-1]
    x0 = _x_start(sigma_max=sigma_max)
    return solvers.solve(gaussian_denoiser, x0, sigmas, solver, **kwargs), exact(x0, sigma_max, SIGMA_MIN)

def _error(solver, levels, discretization='edm', sigma_max=SIGMA_MAX, **kwargs):
    out, ref = _solve(solver, levels, discretization, sigma_max, **kwargs)
    return float((out - ref).abs().max() / ref.abs().max())

#----------------------------------------------------------------------------
# Time discretisations.

def test_edm_discretization_is_eq5():
    t = sampling.sigma_steps(18, SIGMA_MIN, SIGMA_MAX, 'edm')
    assert torch.equal(t, sampling.edm_sigma_steps(18, SIGMA_MIN, SIGMA_MAX, 7))
    i = np.arange(18)
    ref = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert np.allclose(t[:-1].numpy(), ref, rtol=1e-14) and t[-1] == 0

def test_vp_discretization_matches_vp_precond():
    # With VPPrecond's sigma range, the fitted beta_d, beta_min are 19.9 and 0.1, so
    # sigma_i = sigma_vp(t_i) for t_i = 1 + i/(N-1) (eps_s - 1) (EDM Table 1).
    vp = networks.VPPrecond(img_resolution=8, img_channels=1, model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[])
    eps_s = 1e-3
    s_min, s_max = float(vp.sigma(torch.tensor(eps_s, dtype=torch.float64))), float(vp.sigma(torch.tensor(1.0, dtype=torch.float64)))
    t = sampling.sigma_steps(10, s_min, s_max, 'vp', epsilon_s=eps_s)
    ref = vp.sigma(1 + torch.arange(10, dtype=torch.float64) / 9 * (eps_s - 1))
    assert torch.allclose(t[:-1], ref, rtol=1e-10)

@pytest.mark.parametrize('disc', sampling.DISCRETIZATIONS)
def test_discretizations_run_from_sigma_max_to_sigma_min(disc):
    for n in (1, 2, 7, 40):
        t = sampling.sigma_steps(n, SIGMA_MIN, SIGMA_MAX, disc)
        assert t.dtype == torch.float64 and len(t) == n + 1 and t[-1] == 0
        assert t[0] == pytest.approx(SIGMA_MAX, rel=1e-12)
        if n > 1:
            assert t[-2] == pytest.approx(SIGMA_MIN, rel=1e-12)
        assert (t[1:] < t[:-1]).all()

def test_ve_and_logsnr_are_uniform_in_log_sigma():
    ve = sampling.sigma_steps(12, SIGMA_MIN, SIGMA_MAX, 've')[:-1]
    assert torch.allclose(ve, sampling.sigma_steps(12, SIGMA_MIN, SIGMA_MAX, 'logsnr')[:-1], rtol=1e-14)
    steps = torch.diff(torch.log(ve))
    assert torch.allclose(steps, steps[0].expand_as(steps), rtol=1e-10)

def test_logsnr_warped_is_asinh_warp_of_log_sigma():
    # Independent transcription: u_i linear from g(sigma_max) to g(sigma_min), g(s) = asinh(k ln(s/c)) / k.
    c, k, n = 0.5, 0.3, 12
    u = np.linspace(np.arcsinh(k * np.log(SIGMA_MAX / c)) / k, np.arcsinh(k * np.log(SIGMA_MIN / c)) / k, n)
    t = sampling.sigma_steps(n, SIGMA_MIN, SIGMA_MAX, 'logsnr_warped')
    assert np.allclose(t[:-1].numpy(), c * np.exp(np.sinh(k * u) / k), rtol=1e-12)
    assert t[0] == SIGMA_MAX and t[-2] == SIGMA_MIN and t[-1] == 0 # End points exact.
    # Steps in log sigma are smallest around sigma_c and grow towards both ends.
    for sigma_c in (0.5, 0.05):
        t = sampling.sigma_steps(40, SIGMA_MIN, SIGMA_MAX, 'logsnr_warped', sigma_c=sigma_c)[:-1]
        steps = -torch.diff(torch.log(t))
        mid = torch.sqrt(t[1:] * t[:-1])
        assert mid[steps.argmin()] == pytest.approx(sigma_c, rel=0.15)
        assert steps[0] > 1.2 * steps.min() and steps[-1] > 1.2 * steps.min()
    # k = 0 is the uniform log-SNR sequence.
    assert torch.allclose(sampling.sigma_steps(12, SIGMA_MIN, SIGMA_MAX, 'logsnr_warped', warp_k=0),
        sampling.sigma_steps(12, SIGMA_MIN, SIGMA_MAX, 'logsnr'), rtol=1e-13)

def test_discretization_bad_input():
    with pytest.raises(ValueError, match="unknown discretization 'cosine'"):
        sampling.sigma_steps(5, SIGMA_MIN, SIGMA_MAX, 'cosine')
    with pytest.raises(ValueError, match='num_steps must be >= 1'):
        sampling.sigma_steps(0, SIGMA_MIN, SIGMA_MAX)
    with pytest.raises(ValueError) as err:
        sampling.sigma_steps(5, SIGMA_MIN, SIGMA_MAX, 'logsnr_warped', sigma_c=0)
    assert str(err.value) == 'sigma_c must be a noise level > 0 (the centre of the logsnr_warped steps), got 0'
    with pytest.raises(ValueError) as err:
        sampling.sigma_steps(5, SIGMA_MIN, SIGMA_MAX, 'logsnr_warped', warp_k=-0.1)
    assert str(err.value) == 'warp_k must be >= 0 (0 = uniform log-SNR steps), got -0.1'

#----------------------------------------------------------------------------
# Exactness and convergence order on the Gaussian closed form: the error ratio
# when the number of steps doubles is 2^order.

# UniC raises the order of dpmpp_2m to 3 and that of dpmpp_3m to 4 (UniC-p: p + 1).

ORDER_CASES = [
    ('euler',    {},                             [32, 64, 128],  1, 0.15),
    ('heun',     {},                             [32, 64, 128],  2, 0.2),
    ('dpmpp_2m', {},                             [32, 64, 128],  2, 0.25),
    ('dpmpp_3m', {},                             [48, 96, 192],  3, 0.35),
    ('dpmpp_2m', dict(corrector='unic'),         [32, 64, 128],  3, 0.25),
    ('dpmpp_3m', dict(corrector='unic'),         [32, 64, 128],  4, 0.25),
    # The exponential integrator about the Gaussian denoiser, with a sigma_data that is not the data's
    # std (1.0 vs S_DATA = 0.5): with sigma_data = S_DATA it is exact (test below), which shows no order.
    ('gauss_2m', dict(sigma_data=1.0),                       [48, 96, 192], 2, 0.1),
    ('gauss_3m', dict(sigma_data=1.0, discretization='logsnr'), [48, 96, 192], 3, 0.2),
    ('gauss_2m', dict(corrector='unic', sigma_data=0.2, discretization='logsnr'), [48, 96, 192], 3, 0.15),
    ('gauss_3m', dict(corrector='unic', sigma_data=1.0, discretization='logsnr'), [48, 96, 192], 4, 0.3),
    # The same integrator with the residual interpolated as R / sqrt(sigma) (sampling.preset=fast): same orders.
    ('gauss_2m_sqrt', dict(sigma_data=1.0),                  [48, 96, 192], 2, 0.2),
    ('gauss_3m_sqrt', dict(sigma_data=1.0),                  [48, 96, 192], 3, 0.1),
    ('gauss_2m_sqrt', dict(corrector='unic', sigma_data=1.0), [48, 96, 192], 3, 0.2),
    ('gauss_3m_sqrt', dict(corrector='unic', sigma_data=1.0), [96, 192, 384], 4, 0.3),
]

@pytest.mark.parametrize('solver, kwargs, levels, order, tol', ORDER_CASES)
def test_gaussian_closed_form_convergence_order(solver, kwargs, levels, order, tol):
    errors = [_error(solver, n, **kwargs) for n in levels]
    rates = [np.log2(a / b) for a, b in zip(errors[:-1], errors[1:])]
    assert all(abs(r - order) < tol for r in rates), (solver, errors, rates)
    assert errors[-1] < {1: 3e-2, 2: 1e-3, 3: 3e-4, 4: 3e-5}[order], (solver, errors)

def _fit_order(errors, levels):
    # Slope of log error against log steps (least squares over all points), negated.
    return -float(np.polyfit(np.log(levels), np.log(errors), 1)[0])

@pytest.mark.parametrize('solver, kwargs, levels, order, tol', [case for case in ORDER_CASES if case[0].startswith('gauss')])
def test_gauss_solvers_fitted_order(solver, kwargs, levels, order, tol):
    levels = [levels[0], int(levels[0] * 2 ** 0.5), levels[1], int(levels[1] * 2 ** 0.5), levels[2]]
    errors = [_error(solver, n, **kwargs) for n in levels]
    assert abs(_fit_order(errors, levels) - order) < tol, (solver, kwargs, errors)

@pytest.mark.parametrize('solver, kwargs', [('gauss_2m', {}), ('gauss_3m', dict(corrector='unic')), ('gauss_3m', dict(corrector='unic', afs=True)),
    ('gauss_2m_sqrt', {}), ('gauss_3m_sqrt', dict(corrector='unic', afs=True))])
def test_gauss_solvers_exact_for_gaussian_data_of_std_sigma_data(solver, kwargs):
    # R = D - G = 0: every step is the exact solution x(t) = x(s) c_t / c_s, whatever the steps.
    assert _error(solver, 4, 'logsnr_warped', sigma_data=S_DATA, **kwargs) < 1e-13
    assert _error(solver, 4, 'logsnr_warped', sigma_data=0.3, **kwargs) > 1e-3 # Another sigma_data is not.

@pytest.mark.parametrize('corrector', ['none', 'unic'])
@pytest.mark.parametrize('p', [2, 3])
def test_gauss_solvers_with_sigma_data_0_are_exponential_adams(p, corrector):
    # sigma_data = 0: c(sigma) = sigma, weight e^lambda, R = D, i.e. the exponential integrator of
    # DPM-Solver++ with the exact integral of the polynomial through the last p outputs (p + 1 with
    # UniC): exact for an x-independent D(lambda) of degree p - 1 (p) on the steps with full history.
    unic = corrector == 'unic'
    errors = _unic_step_errors(f'gauss_{p}m', degree=p - 1 + unic, corrector=corrector, sigma_data=0)
    exact_steps = errors[p - 1:len(errors) - unic]
    assert len(exact_steps) >= 4 and max(exact_steps) < 1e-12, errors
    assert min(_unic_step_errors(f'gauss_{p}m', degree=p + unic, corrector=corrector, sigma_data=0)[p - 1:len(errors) - unic]) > 1e-5
    # dpmpp_3m (+ UniC) is that integrator too, from its third step on.
    if p == 3:
        den = lambda x, sigma: 0.3 + 0.7 * torch.tanh(x / (1 + sigma)) # Any smooth denoiser.
        x0 = _x_start(16)
        sig = UNEVEN_SIGMAS[:3]
        x2a = solvers.solve(den, x0, sig, 'gauss_3m', corrector=corrector, sigma_data=0)
        x2b = solvers.solve(den, x0, sig, 'dpmpp_3m', corrector=corrector)
        assert not torch.allclose(x2a, x2b, rtol=1e-6) # The second step differs (DPM-Solver++ 2M's weight 1/(2r) vs the exact one).

def test_sqrt_solvers_interpolate_r_over_sqrt_sigma():
    # gauss_*_sqrt: the polynomial in lambda goes through Q = R / sqrt(sigma), so an x-independent
    # residual R(sigma) = sqrt(sigma) b (lambda - lambda_0) is integrated exactly by gauss_2m_sqrt
    # (degree 1) on every step with full history, and not by gauss_2m (which fits R itself);
    # reference: the same step map by quadrature with 400 Gauss-Legendre nodes. R(sigma_0) = 0, so
    # the mean fitted to the first output is 0.
    sd = 0.5
    b = torch.tensor([0.1, -0.25], dtype=torch.float64)
    resid = lambda sigma: torch.sqrt(sigma) * b * (np.log(float(UNEVEN_SIGMAS[0])) - torch.log(sigma))
    den = lambda x, sigma: x * sd ** 2 / (sigma ** 2 + sd ** 2) + resid(sigma)
    sig = UNEVEN_SIGMAS
    states = {}
    def record(x, sigma):
        states[float(sigma)] = x.clone()
        return x
    x0 = torch.tensor([0.7, -1.1], dtype=torch.float64) * 10
    nodes, weights = (torch.as_tensor(v, dtype=torch.float64) for v in np.polynomial.legendre.leggauss(400))
    c = lambda lam: torch.sqrt(torch.exp(-2 * lam) + sd ** 2)
    def exact_step(x, s, t):
        ls, lt = -np.log(s), -np.log(t)
        u = 0.5 * (lt - ls) * (nodes + 1) + ls
        integral = (0.5 * (lt - ls) * weights[:, None] * resid(torch.exp(-u)[:, None]) / c(u)[:, None]).sum(0)
        return c(torch.tensor(lt)) / c(torch.tensor(ls)) * x + c(torch.tensor(lt)) * integral
    for solver, exact_expected in (('gauss_2m_sqrt', True), ('gauss_2m', False)):
        states.clear()
        solvers.solve(den, x0, sig, solver, sigma_data=sd, project=record)
        s_list = sig.tolist()
        errors = [float((states[s_list[i + 1]] - exact_step(states[s_list[i]], s_list[i], s_list[i + 1])).abs().max()) for i in range(1, len(s_list) - 1)]
        if exact_expected:
            assert max(errors) < 1e-12, (solver, errors)
        else:
            assert max(errors) > 1e-4, (solver, errors)

def test_sqrt_solvers_correct_the_step_into_sigma_min():
    # gauss_*_sqrt + UniC: the step into sigma_min is predicted with the last residual, corrected with
    # the output D~ at the predicted point x~ (the evaluation the final x = D needs anyway), and the
    # result is x_c - (x~ - D~): the corrected state denoised with the noise estimate of x~. No extra evaluation.
    den = lambda x, sigma: 0.3 + 0.7 * torch.tanh(x / (1 + sigma)) # Any smooth denoiser.
    sig = torch.tensor([80.0, 10.0, 1.0, 0.1, 0.0], dtype=torch.float64)
    x0 = _x_start(8)
    seen = []
    def record(x, sigma):
        seen.append((float(sigma), x.clone()))
        return x
    out = solvers.solve(den, x0, sig, 'gauss_3m_sqrt', corrector='unic', project=record)
    assert [s for s, _ in seen] == [80.0, 10.0, 10.0, 1.0, 1.0, 0.1, 0.1, 0.0] # Predicted point, then corrected state, at 10, 1 and 0.1.
    x_pred, x_c = seen[5][1], seen[6][1]
    assert not torch.allclose(x_pred, x_c)
    assert torch.allclose(out, x_c - (x_pred - den(x_pred, sig[3])), rtol=1e-13, atol=1e-13)
    assert solvers.num_evaluations('gauss_3m_sqrt', sig, corrector='unic') == 4
    # Without UniC the step into sigma_min is first order and uncorrected, then x = D (as gauss_3m).
    seen.clear()
    out = solvers.solve(den, x0, sig, 'gauss_3m_sqrt', project=record)
    assert torch.allclose(out, den(seen[-2][1], sig[3]), rtol=1e-13, atol=1e-13)

def test_afs_limits_the_order_to_2():
    # The analytic first step is a first-order step (D taken at its end, where the guess places it),
    # so the global order is 2. From sigma_max = 80, D ~ 0 at sigma_max and the guess hardly matters
    # (a test there would not see AFS at all); from sigma_max = 2 it does, and the order shows.
    def rates(levels, **kwargs):
        errors = [_error('dpmpp_3m', n, sigma_max=2, **kwargs) for n in levels]
        return [np.log2(a / b) for a, b in zip(errors[:-1], errors[1:])]
    assert all(abs(r - 4) < 0.25 for r in rates([32, 64, 128], corrector='unic'))
    assert all(abs(r - 2) < 0.15 for r in rates([64, 128, 256], corrector='unic', afs=True))
    # The guess (sigma_data) changes the result from sigma_max = 2, and (almost) not from 80.
    def guess_effect(sigma_max):
        a, _ = _solve('dpmpp_3m', 32, sigma_max=sigma_max, corrector='unic', afs=True, sigma_data=S_DATA)
        b, _ = _solve('dpmpp_3m', 32, sigma_max=sigma_max, corrector='unic', afs=True, sigma_data=0)
        return float((a - b).abs().max() / a.abs().max())
    assert guess_effect(2) > 1e-5 and guess_effect(SIGMA_MAX) < 1e-8

#----------------------------------------------------------------------------
# UniC-p (p = the predictor's order, p - 1 previous outputs + the new one as
# nodes) integrates a denoiser that is a polynomial of degree p in lambda
# exactly. The check uses an x-independent D(lambda) on uneven steps and the
# exact step map x(t) = (sigma_t / sigma_s) x(s) + int_{lambda_s}^{lambda_t}
# e^-(lambda_t - lambda) D(lambda) dlambda, in closed form: with
# S = sum_k (-1)^k D^(k), the integral is S(lambda_t) - e^-(lambda_t - lambda_s) S(lambda_s).
# Exact are the corrected steps that have the full history: not the first
# p - 1 (fewer nodes; UniC-1's a = 1/2 is second order only) and not the last,
# which no evaluation follows (plain predictor).

UNEVEN_SIGMAS = torch.tensor([10.0, 6.0, 2.5, 1.7, 0.6, 0.4, 0.12, 0.05], dtype=torch.float64) # Step ratios 0.6 .. 2.7.
LAMBDA_C = 0.5 # Centre of the polynomials in lambda.

def _exp_integral(coefs, lam_s, lam_t):
    out = []
    for c in coefs.tolist():
        p = np.polynomial.Polynomial(c)
        s = lambda lam: sum((-1) ** k * p.deriv(k)(lam - LAMBDA_C) for k in range(len(c)))
        out.append(s(lam_t) - np.exp(-(lam_t - lam_s)) * s(lam_s))
    return torch.tensor(out, dtype=torch.float64)

def _unic_step_errors(solver, degree, corrector='unic', **kwargs):
    coefs = torch.randn(4, degree + 1, dtype=torch.float64, generator=torch.Generator().manual_seed(degree)) # 4 polynomials.
    den = lambda x, sigma: sum(coefs[:, k] * (-torch.log(sigma) - LAMBDA_C) ** k for k in range(degree + 1)) + 0 * x
    states = {} # sigma -> state after the step into it (project sees the predicted point first, then the corrected state).
    def record(x, sigma):
        states[float(sigma)] = x.clone()
        return x
    x0 = torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    solvers.solve(den, x0, UNEVEN_SIGMAS, solver, corrector=corrector, project=record, **kwargs)
    sig, lam = UNEVEN_SIGMAS.tolist(), (-torch.log(UNEVEN_SIGMAS)).tolist()
    errors = []
    for i in range(len(sig) - 1):
        ref = sig[i + 1] / sig[i] * states[sig[i]] + _exp_integral(coefs, lam[i], lam[i + 1])
        errors.append(float((states[sig[i + 1]] - ref).abs().max() / ref.abs().max()))
    return errors

@pytest.mark.parametrize('solver, p', [('dpmpp_2m', 2), ('dpmpp_3m', 3)])
def test_unic_is_exact_for_polynomial_denoisers(solver, p):
    errors = _unic_step_errors(solver, degree=p)
    exact_steps = errors[p - 1:-1]
    assert len(exact_steps) >= 4 and max(exact_steps) < 1e-12, errors
    # One degree more is not integrated exactly (the test can tell).
    assert min(_unic_step_errors(solver, degree=p + 1)[p - 1:-1]) > 1e-5

def test_unic_steps_by_hand():
    # sigmas 80 -> 10 -> 1 (no final 0). Step 1: exponential Euler predicts x~1, D1 = D(x~1; 10),
    # UniC-1 (bh2, a = 1/2) recomputes x1 = r x0 + J0 (D0 + D1) / 2. Step 2 is the last (no
    # evaluation follows): plain DPM-Solver++(2M) with the history D1 (at x~1), D0.
    den = lambda x, sigma: 0.3 + 0.7 * torch.tanh(x / (1 + sigma)) # Any smooth denoiser.
    sig = torch.tensor([80.0, 10.0, 1.0], dtype=torch.float64)
    x0 = _x_start(8)
    lam = -torch.log(sig)
    h1, h2 = lam[1] - lam[0], lam[2] - lam[1]
    d0 = den(x0, sig[0])
    x1p = sig[1] / sig[0] * x0 + -torch.expm1(-h1) * d0
    d1 = den(x1p, sig[1])
    x1 = sig[1] / sig[0] * x0 + -torch.expm1(-h1) * (d0 + d1) / 2
    r = h1 / h2
    x2 = sig[2] / sig[1] * x1 + -torch.expm1(-h2) * ((1 + 1 / (2 * r)) * d1 - 1 / (2 * r) * d0)
    assert torch.allclose(solvers.solve(den, x0, sig, 'dpmpp_2m', corrector='unic'), x2, rtol=1e-13, atol=1e-13)
    # With a final 0 the step into sigma_min is first order and uncorrected, then x = D.
    sig0 = torch.cat([sig, torch.zeros(1, dtype=torch.float64)])
    x2 = sig[2] / sig[1] * x1 + -torch.expm1(-h2) * d1
    assert torch.allclose(solvers.solve(den, x0, sig0, 'dpmpp_2m', corrector='unic'), den(x2, sig[2]), rtol=1e-13, atol=1e-13)
    # AFS: the guess x sd^2/(sigma^2 + sd^2) only places the first evaluation; the first step uses D there.
    sd = 0.5
    xg = sig[1] / sig[0] * x0 + -torch.expm1(-h1) * x0 * sd ** 2 / (sig[0] ** 2 + sd ** 2)
    x1 = sig[1] / sig[0] * x0 + -torch.expm1(-h1) * den(xg, sig[1])
    x2 = sig[2] / sig[1] * x1 + -torch.expm1(-h2) * den(xg, sig[1])
    assert torch.allclose(solvers.solve(den, x0, sig0, 'dpmpp_3m', afs=True, sigma_data=sd), den(x2, sig[2]), rtol=1e-13, atol=1e-13)

@pytest.mark.parametrize('solver', ['euler', 'heun', 'dpmpp_2m', 'dpmpp_3m'])
@pytest.mark.parametrize('disc', sampling.DISCRETIZATIONS)
def test_gaussian_closed_form_full_sampler(solver, disc):
    # With the trailing sigma = 0 (last step x = D(x; sigma_min)) the result approaches
    # x(0) up to that final step's error, relative ~ sigma_min^2 / (2 s^2) = 8e-6. The VP
    # steps are coarse at low noise (few levels below sigma = 0.01), hence its looser bound.
    x0 = _x_start()
    sigmas = sampling.sigma_steps(256, SIGMA_MIN, SIGMA_MAX, disc)
    out = solvers.solve(gaussian_denoiser, x0, sigmas, solver)
    ref = exact(x0, SIGMA_MAX, 0)
    tol = 3e-2 if solver == 'euler' else 1e-2 if disc == 'vp' else 5e-4
    assert float((out - ref).abs().max() / ref.abs().max()) < tol

def test_multistep_solvers_beat_heun_at_equal_evaluations():
    # 35 evaluations: Heun with 18 levels vs DPM-Solver++ with 35 levels (EDM schedule).
    heun = _error('heun', 18)
    assert _error('dpmpp_2m', 35) < heun / 2
    assert _error('dpmpp_3m', 35) < heun / 10

#----------------------------------------------------------------------------
# Reverse SDE and churn: the marginal at sigma = 0 is N(0, s^2).

@pytest.mark.parametrize('solver, kwargs', [('dpmpp_2m_sde', {}), ('heun', dict(S_churn=40)), ('euler', dict(S_churn=10))])
def test_stochastic_solvers_reach_data_distribution(solver, kwargs):
    torch.manual_seed(0)
    x0 = torch.randn(40000, dtype=torch.float64) * np.sqrt(SIGMA_MAX ** 2 + S_DATA ** 2)
    sigmas = sampling.sigma_steps(100, SIGMA_MIN, SIGMA_MAX, 'logsnr')
    out = solvers.solve(gaussian_denoiser, x0, sigmas, solver, **kwargs)
    assert float(out.std()) == pytest.approx(S_DATA, rel=0.03 if solver != 'euler' else 0.06) # Euler: 1st-order bias.
    assert abs(float(out.mean())) < 0.02
    # Different from the ODE solution: the noise is really used.
    assert not torch.allclose(out, solvers.solve(gaussian_denoiser, x0, sigmas, 'heun'))

#----------------------------------------------------------------------------
# The same code serves images, volumes and label vectors; NFE counts.

@pytest.mark.parametrize('solver', solvers.SOLVERS)
def test_solvers_are_shape_agnostic(solver):
    x = _x_start(2 * 3 * 4 * 4 * 4)
    sigmas = sampling.sigma_steps(6, SIGMA_MIN, SIGMA_MAX)
    outs = []
    for shape in ([2, 3, 4, 16], [2, 3, 4, 4, 4], [2 * 3 * 4 * 4, 4]): # Images, volumes, label vectors.
        noise = iter(torch.randn(50, x.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
        out = solvers.solve(gaussian_denoiser, x.reshape(shape), sigmas, solver, randn_like=lambda t: next(noise).reshape(t.shape))
        assert out.shape == torch.Size(shape) and out.dtype == torch.float64
        outs.append(out.flatten())
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])

@pytest.mark.parametrize('solver, kwargs, nfe', [('heun', {}, 2 * 9 - 1), ('euler', {}, 9), ('dpmpp_2m', {}, 9), ('dpmpp_3m', {}, 9),
    ('dpmpp_2m_sde', {}, 9), ('dpmpp_2m', dict(corrector='unic'), 9), ('dpmpp_3m', dict(corrector='unic'), 9),
    ('dpmpp_2m', dict(afs=True), 8), ('dpmpp_3m', dict(corrector='unic', afs=True), 8), ('gauss_2m', {}, 9),
    ('gauss_3m', dict(corrector='unic'), 9), ('gauss_3m', dict(corrector='unic', afs=True), 8),
    ('gauss_3m_sqrt', dict(corrector='unic'), 9), ('gauss_2m_sqrt', dict(corrector='unic', afs=True), 8)])
@pytest.mark.parametrize('final_zero', [True, False])
def test_number_of_evaluations(solver, kwargs, nfe, final_zero):
    calls = []
    def counting(x, sigma):
        calls.append(float(sigma))
        return gaussian_denoiser(x, sigma)
    sigmas = sampling.sigma_steps(9, SIGMA_MIN, SIGMA_MAX, 'logsnr_warped')
    if not final_zero: # Ends at sigma_min: the same count of steps, one level fewer.
        sigmas = torch.cat([sigmas[:1] * 2, sigmas[:-1]])
    solvers.solve(counting, _x_start(4), sigmas, solver, **kwargs)
    nfe += int(solver == 'heun' and not final_zero) # Heun corrects the last step too when it ends at sigma > 0.
    assert len(calls) == nfe == solvers.num_evaluations(solver, sigmas, **kwargs)
    assert min(calls) > 0 # sigma = 0 is never passed to the network.
    if kwargs.get('afs'):
        assert float(sigmas[0]) not in calls # No evaluation at sigma_max.

@pytest.mark.parametrize('kwargs', [dict(afs=True), dict(corrector='unic', afs=True)])
@pytest.mark.parametrize('solver', ['dpmpp_2m', 'dpmpp_3m'])
def test_number_of_evaluations_afs_single_step(solver, kwargs):
    # sigmas = [sigma_0, sigma_1]: AFS evaluates once, at sigma_1, and no following step reuses it.
    calls = []
    def counting(x, sigma):
        calls.append(float(sigma))
        return gaussian_denoiser(x, sigma)
    sigmas = torch.tensor([SIGMA_MAX, 1.0], dtype=torch.float64)
    solvers.solve(counting, _x_start(4), sigmas, solver, **kwargs)
    assert calls == [1.0] and solvers.num_evaluations(solver, sigmas, **kwargs) == 1

def test_bad_solver_arguments():
    sigmas = sampling.sigma_steps(4, SIGMA_MIN, SIGMA_MAX)
    with pytest.raises(ValueError, match=r"solver: unknown solver 'rk45' \(choose from heun, euler, dpmpp_2m"):
        solvers.solve(gaussian_denoiser, _x_start(4), sigmas, 'rk45')
    with pytest.raises(ValueError, match='S_churn: churn applies to the heun and euler solvers'):
        solvers.solve(gaussian_denoiser, _x_start(4), sigmas, 'dpmpp_2m', S_churn=1)
    with pytest.raises(ValueError, match='must decrease strictly'):
        solvers.solve(gaussian_denoiser, _x_start(4), sigmas.flip(0)[1:], 'euler')
    for kwargs, message in [
        (dict(solver='dpmpp_2m', corrector='unipc'), "corrector: unknown corrector 'unipc' (choose from none, unic)"),
        (dict(solver='heun', corrector='unic'), "corrector: the UniC corrector applies to the dpmpp_2m, dpmpp_3m, gauss_2m, gauss_3m, gauss_2m_sqrt, gauss_3m_sqrt solvers, not 'heun' (set corrector='none')"),
        (dict(solver='dpmpp_2m_sde', afs=True), "afs: the analytic first step applies to the dpmpp_2m, dpmpp_3m, gauss_2m, gauss_3m, gauss_2m_sqrt, gauss_3m_sqrt solvers, not 'dpmpp_2m_sde' (set afs=False)"),
        (dict(solver='dpmpp_2m', afs=True, sigma_data=-1), 'sigma_data must be >= 0 (the data std of the analytic first step), got -1'),
    ]:
        with pytest.raises(ValueError) as err:
            solvers.solve(gaussian_denoiser, _x_start(4), sigmas, **kwargs)
        assert str(err.value) == message
    with pytest.raises(ValueError) as err:
        solvers.solve(gaussian_denoiser, _x_start(4), sampling.sigma_steps(1, SIGMA_MIN, SIGMA_MAX), 'dpmpp_3m', afs=True)
    assert str(err.value) == 'afs: the analytic first step needs a first step that ends at a noise level > 0 (at least 2 noise levels > 0)'

#----------------------------------------------------------------------------
# sampling.sample passes the new options on; sigma_c defaults to the network's sigma_data.

class _GaussianNet: # The ideal denoiser of N(0, sd^2) data, with a network's interface.
    sigma_min, sigma_max, label_dim = 0.002, 80, 0
    def __init__(self, sigma_data=0.5):
        self.sigma_data = sigma_data
        self.calls = 0
    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)
    def __call__(self, x, sigma, class_labels=None, cond=None):
        self.calls += 1
        return x * (self.sigma_data ** 2 / (self.sigma_data ** 2 + sigma.to(torch.float64) ** 2)).to(x.dtype)

def test_sample_plumbs_corrector_afs_and_warp():
    latents = torch.randn(3, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    kw = dict(solver='dpmpp_3m', discretization='logsnr_warped', corrector='unic', afs=True, num_steps=8)
    net = _GaussianNet(sigma_data=0.3)
    out = sampling.sample(net, latents, **kw)
    assert net.calls == 7 # 8 levels > 0, no evaluation at sigma_max.
    sigmas = sampling.sigma_steps(8, 0.002, 80, 'logsnr_warped', sigma_c=0.3)
    den = sampling.make_denoiser(_GaussianNet(sigma_data=0.3))
    ref = solvers.solve(den, latents * 80, sigmas, 'dpmpp_3m', corrector='unic', afs=True, sigma_data=0.3)
    assert torch.equal(out, ref)
    assert not torch.equal(sampling.sample(_GaussianNet(sigma_data=0.3), latents, sigma_c=0.5, **kw), out)
    with pytest.raises(ValueError) as err:
        sampling.reconstruct(net, latents, latents, sigma_start=1.0, **kw)
    assert str(err.value) == ('afs: the analytic first step assumes pure noise at sigma_max; it does not apply to '
        'partial-noise reconstruction (set afs=False)')

#----------------------------------------------------------------------------
# The named setting sampling.preset=fast: resolved by the one validation and by sample().

FAST = dict(solver='gauss_3m_sqrt', discretization='logsnr_warped', corrector='unic', afs=True, warp_k=0.5, sigma_c=None, sigma_min=None)

def test_preset_fast_resolves_to_its_solver_options():
    assert sampling.SAMPLER_PRESETS['fast'] == FAST
    o = sampling.check_sampler_options(dict(preset='fast', num_steps=11))
    assert {k: o[k] for k in FAST} == FAST and o['num_steps'] == 11 and o['preset'] == 'fast'
    assert sampling.check_sampler_options(o) == o # Idempotent: a resolved dict passes again.
    # The preset's own values, or the defaults, are no conflict; another value is.
    assert sampling.check_sampler_options(dict(preset='fast', solver='gauss_3m_sqrt', afs=False, warp_k=0.3, sigma_min=0.002)) == o | dict(num_steps=18)
    with pytest.raises(ValueError) as err:
        sampling.check_sampler_options(dict(preset='fast', solver='dpmpp_2m'))
    assert str(err.value) == 'sampling.solver=dpmpp_2m conflicts with sampling.preset=fast, which sets solver=gauss_3m_sqrt (leave out one of them)'
    with pytest.raises(ValueError) as err:
        sampling.check_sampler_options(dict(preset='fast', sigma_min=0.01))
    assert str(err.value) == ('sampling.sigma_min=0.01 conflicts with sampling.preset=fast, which sets sigma_min=max(0.014*sigma_data, 0.002) '
        '(leave out one of them)')
    with pytest.raises(ValueError) as err: # The preset's last level is checked against sigma_max before anything runs.
        sampling.check_sampler_options(dict(preset='fast', sigma_max=0.001))
    assert str(err.value) == ('sampling.sigma_max=0.001 must exceed the last noise level of sampling.preset=fast, '
        'max(0.014*sigma_data, 0.002)')
    with pytest.raises(ValueError) as err:
        sampling.check_sampler_options(dict(preset='fast', sigma_c=0.3))
    assert str(err.value) == ('sampling.sigma_c=0.3 conflicts with sampling.preset=fast, which sets sigma_c=(1 to 1.4)*sigma_data over NFE 6 '
        'to 10 (leave out one of them)')
    with pytest.raises(ValueError) as err: # None (the preset's multiple of sigma_data) only where a preset sets it.
        sampling.check_sampler_options(dict(sigma_min=None))
    assert str(err.value) == 'sampling.sigma_min: expected a number, got None'
    with pytest.raises(ValueError) as err:
        sampling.check_sampler_options(dict(preset='quick'), names={'preset': '--preset'})
    assert str(err.value) == "--preset: unknown preset 'quick' (choose from fast, or null)"

def test_sample_with_preset_is_the_explicit_options():
    latents = torch.randn(2, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    net = _GaussianNet(sigma_data=0.3)
    out = sampling.sample(net, latents, preset='fast', num_steps=9)
    assert net.calls == 8 # AFS: NFE = num_steps - 1.
    # sigma_c and sigma_min: multiples of the network's sigma_data; sigma_c 1.2 sigma_data at 8 NFE (1.0 at <= 6, 1.4 at >= 10).
    explicit = lambda c, m: sampling.sample(_GaussianNet(sigma_data=0.3), latents, num_steps=9, **dict(FAST, sigma_c=c, sigma_min=m))
    assert torch.equal(out, explicit(1.2 * 0.3, 0.014 * 0.3))
    assert not torch.equal(out, explicit(1.4 * 0.3, 0.014 * 0.3)) and not torch.equal(out, explicit(1.2 * 0.3, 0.007))
    level = sampling.preset_level
    assert [level('sigma_c', None, 'fast', 0.5, n) for n in (4, 6, 7, 8, 9, 10, 20)] == pytest.approx([0.5, 0.5, 0.55, 0.6, 0.65, 0.7, 0.7])
    assert level('sigma_min', None, 'fast', 0.5) == 0.007 and level('sigma_c', None, None, 0.5) == 0.5
    assert level('sigma_min', None, 'fast', 0.1) == 0.002 and level('sigma_min', None, 'fast', 1.0) == 0.014 # At least EDM's 0.002.
    assert level('sigma_c', 0.2, 'fast', 0.5) == 0.2 and level('sigma_min', 0.01, None, 0.5) == 0.01
    with pytest.raises(ValueError, match=r"^sigma_min: None needs a preset that sets it \(got preset=None\)$"):
        level('sigma_min', None, None, 0.5)
    with pytest.raises(ValueError, match=r"^sigma_min: None needs a preset that sets it \(got preset=None\)$"):
        sampling.sample(net, latents, sigma_min=None)
    with pytest.raises(ValueError, match=r"^sigma_c: the preset 'fast' sets it per number of evaluations; nfe is needed$"):
        level('sigma_c', None, 'fast', 0.5)
    o = sampling.check_sampler_options(dict(preset='fast', num_steps=9))
    assert sampling.resolve_levels(o, 0.3) == dict(o, sigma_c=pytest.approx(1.2 * 0.3), sigma_min=pytest.approx(0.014 * 0.3)) # What a record says.
    assert sampling.resolve_levels(dict(o, preset=None, sigma_min=0.002), 0.3)['sigma_c'] is None # Without a preset: unchanged.
    assert sampling.resolve_levels(o, 0.3, net_sigma_min=0.02)['sigma_min'] == 0.02 # The network's own floor, as sample().
    assert sampling.resolve_levels(dict(sigma_min=0.01), 0.3) == dict(sigma_min=0.01) # Partial options without a preset.
    assert [solvers.evaluations(*a) for a in (('heun', 18), ('dpmpp_2m', 10), ('gauss_3m_sqrt', 9, True), ('dpmpp_3m', 1, True))] == [35, 10, 8, 1]
    with pytest.raises(ValueError, match='^discretization=logsnr conflicts with preset=fast, which sets discretization=logsnr_warped'):
        sampling.sample(net, latents, preset='fast', discretization='logsnr', corrector='unic')

#----------------------------------------------------------------------------
# edm_sampler (used by the training loop for sample grids) is still EDM's
# Algorithm 2, bit for bit: an independent transcription of the algorithm.

def _algorithm2(net, latents, randn_like, num_steps, S_churn):
    t = sampling.edm_sigma_steps(num_steps, 0.002, 80, 7)
    x = latents.to(torch.float64) * t[0]
    for i in range(num_steps):
        gamma = min(S_churn / num_steps, np.sqrt(2) - 1)
        t_hat = torch.as_tensor(t[i] + gamma * t[i], dtype=torch.float64)
        x_hat = x + (t_hat ** 2 - t[i] ** 2).sqrt() * randn_like(x)
        d = (x_hat - net(x_hat.float(), t_hat.float()).double()) / t_hat
        x = x_hat + (t[i + 1] - t_hat) * d
        if i < num_steps - 1:
            d2 = (x - net(x.float(), t[i + 1].float()).double()) / t[i + 1]
            x = x_hat + (t[i + 1] - t_hat) * (0.5 * d + 0.5 * d2)
    return x

@pytest.mark.parametrize('S_churn', [0, 5])
def test_edm_sampler_is_algorithm_2(S_churn):
    torch.manual_seed(0)
    net = networks.EDMPrecond(img_resolution=8, img_channels=1, model_type='SongUNet', model_channels=8, channel_mult=[1],
        num_blocks=1, attn_resolutions=[], dropout=0).eval().requires_grad_(False)
    results = []
    for fn in (_algorithm2, None):
        rnd = sampling.StackedRandomGenerator('cpu', [3, 4])
        latents = rnd.randn([2, 1, 8, 8])
        with torch.no_grad():
            if fn is None:
                results.append(sampling.edm_sampler(net, latents, randn_like=rnd.randn_like, num_steps=4, S_churn=S_churn))
            else:
                results.append(fn(net, latents, rnd.randn_like, 4, S_churn))
    assert torch.equal(results[0], results[1])

#----------------------------------------------------------------------------
