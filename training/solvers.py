# medEDM: diffusion-model training toolkit for medical imaging.

"""Solvers of the probability-flow ODE and of the reverse SDE in EDM's
parametrisation (sigma(t) = t, s(t) = 1): dx/dsigma = (x - D(x; sigma)) / sigma
(Karras et al. 2022, Eq. 4 with Table 1).

Every solver is a pure function of a denoiser `denoise(x, sigma) -> D(x)`
(float64 in, float64 out, sigma a 0-d float64 tensor), the initial state
x = x(sigmas[0]) and a decreasing noise-level sequence `sigmas` (normally
ending in 0). Nothing here knows about networks, labels or batches, so the
same code serves 2-D images, 3-D volumes and label vectors.

Solvers (NFE = number of denoiser evaluations for N noise levels > 0 followed by 0):
    euler         Euler steps (EDM Algorithm 2 without the correction), NFE = N.
    heun          EDM Algorithm 2: Heun's 2nd-order method with optional churn
                  (S_churn > 0 makes it stochastic), NFE = 2N - 1.
    dpmpp_2m      DPM-Solver++(2M), Lu et al. 2022 ("DPM-Solver++: Fast Solver
                  for Guided Sampling of Diffusion Probabilistic Models"),
                  Algorithm 2: 2nd-order multistep in lambda = -log sigma, NFE = N.
    dpmpp_3m      3rd-order multistep variant of the same exponential integrator
                  (Taylor terms up to D'' estimated from three past outputs), NFE = N.
    dpmpp_2m_sde  SDE-DPM-Solver++(2M) (Lu et al. 2022, Sec. 5 / App.): the
                  reverse SDE integrated with the same multistep data
                  prediction, fresh Gaussian noise every step, NFE = N.
    gauss_2m, gauss_3m
                  Exponential integrators about a Gaussian denoiser (std
                  sigma_data, mean fitted to the first output): the part of the ODE that
                  Gaussian data would give is solved exactly, the rest (small
                  and smooth at high noise) by multistep of order 2 / 3, NFE = N.
                  Exact for Gaussian data of std sigma_data. Accept UniC
                  (orders 3 / 4) and AFS.
    gauss_2m_sqrt, gauss_3m_sqrt
                  The same integrator with the residual R interpolated as
                  R / sqrt(sigma) (a polynomial in lambda through R_m / sqrt(sigma_m),
                  integrated exactly against the weight sqrt(sigma) / c), between
                  the data prediction (R itself) and the noise prediction
                  (R / sigma ~ -eps at low noise, as DEIS, Zhang & Chen 2022, which
                  fits eps by a polynomial and integrates it exactly). Orders 2 / 3
                  (UniC 3 / 4), NFE = N. With UniC the step into sigma_min is also
                  corrected, with D~ at its predicted point x~ (the evaluation the
                  final x = D needs anyway), and the result is x_c - (x~ - D~).
                  sampling.preset=fast uses gauss_3m_sqrt.

Options of the multistep solvers (dpmpp_2m, dpmpp_3m, gauss_*), both off by default:
    corrector='unic'  UniC (Zhao et al. 2023, "UniPC"): each step is redone with
                  the denoiser output at the predicted point, which the next
                  step uses anyway; one order higher (3 and 4), same NFE = N.
    afs=True      Analytic first step (Zhou et al. 2024): no evaluation at
                  sigma_max, NFE = N - 1 (N = 1 without a final 0: NFE = 1).
                  For generation from pure noise only. Its first step is
                  first order (local error ~ h^2 dD/dlambda at sigma_max, and
                  the guess moves the point where D is taken), so AFS limits
                  the formal global order to 2, with or without UniC. The
                  effect is negligible where D ~ 0 at sigma_max, i.e. at a
                  large sigma_max such as 80; from sigma_max = 2 dpmpp_3m +
                  UniC converges with order 4 and with AFS with order 2 (tests).

An optional `project(x, sigma) -> x` is applied to the initial state and after
every step at the new noise level; inpainting uses it to replace the known
region (training/sampling.py). With UniC or AFS it is also applied to the
predicted point, at the same noise level as the corrected state that follows:
a projector that adds noise must add the same noise to both.
"""

import math
from typing import Callable

import numpy as np
import torch

SOLVERS = ('heun', 'euler', 'dpmpp_2m', 'dpmpp_3m', 'dpmpp_2m_sde', 'gauss_2m', 'gauss_3m', 'gauss_2m_sqrt', 'gauss_3m_sqrt')
STOCHASTIC_CHURN_SOLVERS = ('heun', 'euler') # Solvers that accept EDM's churn (S_churn > 0).
CORRECTORS = ('none', 'unic')
GAUSS_SOLVERS = {'gauss_2m': (2, 0), 'gauss_3m': (3, 0), 'gauss_2m_sqrt': (2, 0.5), 'gauss_3m_sqrt': (3, 0.5)} # Order, power of the residual's scaling.
MULTISTEP_SOLVERS = ('dpmpp_2m', 'dpmpp_3m', *GAUSS_SOLVERS) # Solvers that accept the UniC corrector and the analytic first step.

def evaluations(solver: str, num_steps: int, afs: bool = False) -> int:
    """Denoiser evaluations (NFE) of `solver` over num_steps noise levels > 0 (the table above)."""
    if solver == 'heun':
        return 2 * num_steps - 1
    return max(num_steps - 1, 1) if afs else num_steps

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Projector = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#----------------------------------------------------------------------------
# Validate a noise-level sequence: float64, 1-D, positive and strictly
# decreasing, except that the last entry may be 0.

def check_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f'sigmas: expected a 1-D sequence of at least 2 noise levels, got shape {tuple(sigmas.shape)}')
    if not torch.isfinite(sigmas).all() or (sigmas[:-1] <= 0).any() or sigmas[-1] < 0:
        raise ValueError(f'sigmas: noise levels must be finite and > 0 (the last may be 0), got {sigmas.tolist()}')
    if (sigmas[1:] >= sigmas[:-1]).any():
        raise ValueError(f'sigmas: noise levels must decrease strictly, got {sigmas.tolist()}')
    return sigmas

#----------------------------------------------------------------------------
# EDM's churn (Algorithm 2, lines 4-6): raise the noise level from t_cur to
# t_hat = t_cur (1 + gamma) by adding fresh noise. As in EDM, the noise is
# drawn every step whenever S_churn > 0 (also where gamma = 0), so the random
# stream of a seed does not depend on S_min / S_max.

def _churn(x, t_cur, num_steps, randn_like, S_churn, S_min, S_max, S_noise, round_sigma):
    gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
    t_hat = t_cur + gamma * t_cur
    if round_sigma is not None:
        t_hat = torch.as_tensor(round_sigma(t_hat), dtype=torch.float64, device=x.device)
    if S_churn > 0:
        x = x + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x)
    return x, t_hat

#----------------------------------------------------------------------------
# Euler and Heun (EDM Algorithm 2). Heun applies the 2nd-order correction
# on every step that does not end at sigma = 0 (with a trailing 0 that is
# EDM's `i < N - 1`), so NFE = 2N - 1.

def _euler_heun(denoise, x, sigmas, second_order, randn_like, S_churn, S_min, S_max, S_noise, round_sigma, project):
    num_steps = len(sigmas) - 1
    x_next = x
    for i, (t_cur, t_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        x_cur = x_next

        # Increase noise temporarily.
        x_hat, t_hat = _churn(x_cur, t_cur, num_steps, randn_like, S_churn, S_min, S_max, S_noise, round_sigma)

        # Euler step.
        d_cur = (x_hat - denoise(x_hat, t_hat)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur

        # Apply 2nd order correction.
        if second_order and t_next > 0:
            d_prime = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
        if project is not None:
            x_next = project(x_next, t_next)
    return x_next

#----------------------------------------------------------------------------
# Exponential-integrator coefficients in lambda = -log sigma (Lu et al. 2022,
# Eq. 9-10 with alpha = 1): over a step of length h,
#   x(t) = (sigma_t / sigma_s) x(s) + sum_k J_k(h) D^(k)(lambda_s),
#   J_k(h) = int_0^h e^-u (h - u)^k / k! du,
# so J_0 = 1 - e^-h, J_1 = h - J_0, J_2 = h^2 / 2 - J_1 and in general
# J_k = h^k / k! - J_(k-1) (integration by parts). Returns J_0 .. J_n.

def _phi(h: torch.Tensor, n: int = 2) -> tuple[torch.Tensor, ...]:
    j = [-torch.expm1(-h)]
    for k in range(1, n + 1):
        j.append(h ** k / math.factorial(k) - j[-1])
    return tuple(j)

#----------------------------------------------------------------------------
# UniC corrector (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector
# Framework for Fast Sampling of Diffusion Models", Sec. 3, UniC-p and its
# order theorem; data-prediction form with alpha = 1). After a predictor step
# from lambda_i to lambda_i + h gives x~, D_new = D(x~; sigma_next) is
# evaluated (the evaluation the next step needs anyway) and the step is redone:
#   x_c = (sigma_next / sigma_i) x_i + J_0(h) D_i + B(h) sum_m a_m (D_m - D_i) / r_m,
# over the nodes m = the p - 1 previous outputs (r_m = (lambda_m - lambda_i) / h < 0)
# and the new one (r = 1), with B(h) = 1 - e^-h = J_0(h) (their "B_2", "bh2").
# The a_m solve the order conditions sum_m a_m r_m^(k-1) = k! J_k(h) / (h^k B(h)),
# k = 1..K (K nodes), i.e. the correction integrates the polynomial through
# the K + 1 outputs exactly (same J_k as above), order p + 1. With the new
# node alone (K = 1) a_1 = 1/2, the paper's UniC-1 choice:
#   x_c = (sigma_next / sigma_i) x_i + J_0(h) (D_i + D_new) / 2.

def _unic(x, ratio, h, d_new, denoised, lambdas):
    d = denoised[0]
    nodes = [(torch.ones_like(h), d_new)] + [((lam - lambdas[0]) / h, dm) for lam, dm in zip(lambdas[1:], denoised[1:])]
    j = _phi(h, len(nodes))
    b_h = j[0] # B(h) = 1 - e^-h.
    if len(nodes) == 1:
        a = [0.5]
    else:
        r = torch.stack([r_m for r_m, _ in nodes])
        R = torch.stack([r ** (k - 1) for k in range(1, len(nodes) + 1)]) # R[k-1, m] = r_m^(k-1).
        g = torch.stack([math.factorial(k) * j[k] / (h ** k * b_h) for k in range(1, len(nodes) + 1)])
        a = torch.linalg.solve(R, g)
    x_c = ratio * x + j[0] * d
    for a_m, (r_m, d_m) in zip(a, nodes):
        x_c = x_c + b_h * a_m * (d_m - d) / r_m
    return x_c

#----------------------------------------------------------------------------
# One DPM-Solver++ step of the order that the outputs `denoised` (newest
# first, at lambdas) allow: 1 (exponential Euler), 2 (Lu et al. 2022,
# Algorithm 2) or 3.

def _dpmpp_step(x, ratio, h, denoised, lambdas):
    d = denoised[0]
    if len(denoised) == 1:
        return ratio * x + _phi(h)[0] * d
    if len(denoised) == 2:
        # Lu et al. 2022, Alg. 2: D~ = (1 + 1/(2r)) D_i - 1/(2r) D_(i-1), r = h_(i-1) / h_i.
        r = (lambdas[0] - lambdas[1]) / h
        d_tilde = (1 + 1 / (2 * r)) * denoised[0] - (1 / (2 * r)) * denoised[1]
        return ratio * x + _phi(h)[0] * d_tilde
    # Newton interpolation through the last three outputs (lambda_s, lambda_s - h1, lambda_s - h1 - h2):
    # D' = d1_0 + h1 (d1_0 - d1_1) / (h1 + h2), D'' = 2 (d1_0 - d1_1) / (h1 + h2).
    h1 = lambdas[0] - lambdas[1]
    h2 = lambdas[1] - lambdas[2]
    d1_0 = (denoised[0] - denoised[1]) / h1
    d1_1 = (denoised[1] - denoised[2]) / h2
    d2 = (d1_0 - d1_1) / (h1 + h2)
    j0, j1, j2 = _phi(h)
    return ratio * x + j0 * d + j1 * (d1_0 + h1 * d2) + j2 * (2 * d2)

#----------------------------------------------------------------------------
# DPM-Solver++ multistep, order 2 (Algorithm 2 of Lu et al. 2022) or 3.
# The first steps use the orders that the history allows; the step to
# sigma = 0 is first order (x = D), since lambda = inf there.
#
# With the UniC corrector every step that is followed by a regular step is
# corrected (UniC-p, p = the predictor's order); the multistep history keeps
# D_new, evaluated at the predicted point, as in UniPC. The step into
# sigma_min (before the final x = D) is not corrected, since no evaluation
# follows it that could serve a next step, and it is first order, as with
# DPM-Solver's "lower_order_final": D hardly changes below sigma_min's
# neighbour, and extrapolating network outputs there only adds their error.
#
# Analytic first step (AFS; Zhou et al. 2024, "Fast ODE-based Sampling for
# Diffusion Models in Around 5 Steps", "analytical first step"): at sigma_max >> sigma_data
# the denoiser is close to that of Gaussian data N(0, sigma_data^2 I),
# D ~ x sigma_data^2 / (sigma^2 + sigma_data^2) (the paper's eps ~ x / sigma is
# D ~ 0, sigma_data = 0). The paper uses this guess as D(x_0) in the first
# step; here it only places the first evaluation: x~_1 = (sigma_1 / sigma_0) x_0
# + J_0 D_guess, D_1 = D(x~_1; sigma_1), then x_1 = (sigma_1 / sigma_0) x_0 + J_0 D_1
# (first order, D taken at the step's end) and D_1 starts the history. Data
# whose mean is far from 0 (bench/sampler_accuracy.py's network) make the
# paper's form lose more than the evaluation it saves; this one does not.
# Either form is a first-order step (local error ~ h^2 dD/dlambda), so the
# global order drops to 2, visibly unless sigma_0 is so large that D ~ 0
# there (sigma_max = 80).

def _dpmpp_multistep(denoise, x, sigmas, order, project, corrector, afs_guess):
    denoised = [] # D of the last `order` steps, newest first.
    lambdas = []  # Their lambda = -log sigma.
    d_next = None # D at the predicted next point (UniC, AFS): the next step's output.
    for i, (t_cur, t_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        t_after = sigmas[i + 2] if i + 2 < len(sigmas) else None # End of the following step, None = no following step.
        lam = -torch.log(t_cur)
        if i == 0 and afs_guess is not None: # Analytic first step (t_next > 0, checked in solve()).
            ratio, j0 = t_next / t_cur, _phi(-torch.log(t_next) - lam)[0]
            x_pred = ratio * x + j0 * afs_guess(x, t_cur)
            if project is not None:
                x_pred = project(x_pred, t_next)
            d_next = denoise(x_pred, t_next)
            x = ratio * x + j0 * d_next
        else:
            d = denoise(x, t_cur) if d_next is None else d_next
            d_next = None
            denoised = [d] + denoised[:order - 1]
            lambdas = [lam] + lambdas[:order - 1]
            if t_next == 0:
                x = d
            else:
                h = -torch.log(t_next) - lam # lambda_next - lambda_cur > 0.
                ratio = t_next / t_cur
                if corrector == 'unic' and t_after is not None and t_after == 0: # Into sigma_min: first order, no correction.
                    x = _dpmpp_step(x, ratio, h, denoised[:1], lambdas[:1])
                elif corrector == 'unic' and t_after is not None:
                    x_pred = _dpmpp_step(x, ratio, h, denoised, lambdas)
                    if project is not None:
                        x_pred = project(x_pred, t_next)
                    d_next = denoise(x_pred, t_next)
                    x = _unic(x, ratio, h, d_next, denoised, lambdas)
                else:
                    x = _dpmpp_step(x, ratio, h, denoised, lambdas)
        if project is not None:
            x = project(x, t_next)
    return x

#----------------------------------------------------------------------------
# Exponential integrator about a Gaussian denoiser (solvers gauss_2m,
# gauss_3m). Split D(x; sigma) = G(x; sigma) + R(x; sigma) with G the ideal
# denoiser of Gaussian data N(mu, sigma_data^2 I),
#   G = mu + (x - mu) sigma_data^2 / (sigma^2 + sigma_data^2).
# The ODE dx/dsigma = (x - D) / sigma then has the linear part
# (x - mu) sigma / (sigma^2 + sigma_data^2), solved exactly by
# c(sigma) = sqrt(sigma^2 + sigma_data^2), and in lambda = -log sigma
# (variation of constants):
#   x(t) - mu = (c_t / c_s) (x(s) - mu) + c_t int_{lambda_s}^{lambda_t} R(lambda) / c(lambda) dlambda.
# Multistep: R is replaced by the polynomial in lambda through the last p
# residuals (R_m = D_m - G at the point where D_m was evaluated), and the
# integral of each Lagrange basis polynomial against the weight 1 / c(lambda)
# is taken by Gauss-Legendre quadrature (16 nodes: exact to rounding for the
# step lengths of a sampler), order p. The UniC corrector (Zhao et al. 2023)
# redoes the step with the polynomial through the new output as well, order
# p + 1, no extra evaluation (the next step uses it).
# mu is fitted, per sample, to the first denoiser output D_1 at (x_1, sigma_1):
# the mean of the Gaussian whose denoiser gives it, mu = (D_1 - a_1 x_1) /
# (1 - a_1), a_1 = sigma_data^2 / (sigma_1^2 + sigma_data^2) (at sigma_1 >>
# sigma_data about the data mean; 0 before it exists, i.e. for AFS's guess),
# then fixed for the whole trajectory. With sigma_data = 0 the integrator is that of
# DPM-Solver++ (c = sigma, weight e^lambda; mu cancels, since the weights
# integrate constants exactly), with exact weights for every order. For
# Gaussian data of std sigma_data (any mean), mu is that mean, R = 0 and
# every step is exact; for any data R stays small and smooth at high noise, where D itself
# grows like e^lambda along a trajectory (the error of data-prediction
# solvers at few steps). AFS: the guess R(sigma_max) = 0 with mu = 0 (the
# Gaussian solution) places the first evaluation, whose output is mu and
# whose residual drives the first step.
# gauss_*_sqrt (power = 1/2): the polynomial goes through Q_m = R_m / sigma_m^power
# instead, and the weights integrate L_m(lambda) sigma(lambda)^power / c(lambda).
# R / sigma -> (D - x) / sigma = -eps at low noise (G -> x there): power = 1 is
# a DEIS-like noise-prediction fit (Zhang & Chen 2022, tAB), power = 0 the data
# prediction above; on bench/sampler_peers.py's trained network the data fit
# loses at low noise (R ~ sigma eps there) and the noise fit at high noise,
# with or without UniC; 1/2 is ahead of both. With UniC the step into
# sigma_min is corrected too: its predicted point x~ gets the evaluation
# D~ = D(x~; sigma_min) that the final x = D needs anyway, the corrected state
# x_c uses it as a node, and the result is x_c - (x~ - D~) (x~ - D~ = sigma_min
# eps~; D is ~ the identity at sigma_min, so this is D(x_c) to first order in
# x_c - x~), no extra evaluation.

_GL_NODES, _GL_WEIGHTS = (torch.as_tensor(a, dtype=torch.float64) for a in np.polynomial.legendre.leggauss(16))

def _gauss_weights(lam_s, lam_t, nodes, sigma_data, power=0):
    # c_t int_{lam_s}^{lam_t} L_m(lambda) sigma(lambda)^power / c(lambda) dlambda for the Lagrange basis L_m over `nodes` (lambdas).
    u = 0.5 * (lam_t - lam_s) * (_GL_NODES.to(lam_s.device) + 1) + lam_s
    wq = 0.5 * (lam_t - lam_s) * _GL_WEIGHTS.to(lam_s.device) * torch.exp(-power * u) / torch.sqrt(torch.exp(-2 * u) + sigma_data ** 2)
    c_t = torch.sqrt(torch.exp(-2 * lam_t) + sigma_data ** 2)
    out = []
    for m, lam_m in enumerate(nodes):
        basis = torch.ones_like(u)
        for k, lam_k in enumerate(nodes):
            if k != m:
                basis = basis * (u - lam_k) / (lam_m - lam_k)
        out.append(c_t * (wq * basis).sum())
    return out

def _gauss_step(x, lam_s, lam_t, residuals, lambdas, sigma_data, power=0):
    c_s = torch.sqrt(torch.exp(-2 * lam_s) + sigma_data ** 2)
    c_t = torch.sqrt(torch.exp(-2 * lam_t) + sigma_data ** 2)
    x = (c_t / c_s) * x
    for w, r in zip(_gauss_weights(lam_s, lam_t, lambdas, sigma_data, power), residuals):
        x = x + w * r
    return x

def _gauss_multistep(denoise, x, sigmas, order, project, corrector, afs, sigma_data, power=0):
    history, lambdas = [], [] # (D, point where it was evaluated, sigma) of the last `order` outputs, newest first; their lambdas.
    pending = None # (D, point, sigma) at the predicted next point (UniC, AFS): the next step's output.
    mu = None # Centre of the Gaussian, from the first output.
    def centre(node): # The mean m of Gaussian data N(m, sigma_data^2) whose denoiser gives D at (x, sigma): D = m + a (x - m).
        d, p, sig = node
        a = sigma_data ** 2 / (sig ** 2 + sigma_data ** 2)
        return (d - a * p) / (1 - a)
    def step(x, lam_s, lam_t, nodes, node_lambdas):
        m = 0 if mu is None else mu
        res = [(d - m - (p - m) * (sigma_data ** 2 / (sig ** 2 + sigma_data ** 2))) / sig ** power for d, p, sig in nodes]
        return m + _gauss_step(x - m, lam_s, lam_t, res, node_lambdas, sigma_data, power)
    final_eps = None # sqrt solvers + UniC: sigma_min * eps at the predicted point of the corrected step into sigma_min.
    for i, (t_cur, t_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        t_after = sigmas[i + 2] if i + 2 < len(sigmas) else None
        lam = -torch.log(t_cur)
        if i == 0 and afs: # R(sigma_max) = 0, mu = 0: the Gaussian solution places the first evaluation.
            lam_t = -torch.log(t_next)
            x_pred = step(x, lam, lam_t, [], [])
            if project is not None:
                x_pred = project(x_pred, t_next)
            pending = (denoise(x_pred, t_next), x_pred, t_next)
            mu = centre(pending)
            x = step(x, lam, lam_t, [pending], [lam_t])
        else:
            node = (denoise(x, t_cur), x, t_cur) if pending is None else pending
            pending = None
            mu = centre(node) if mu is None else mu
            history = [node] + history[:order - 1]
            lambdas = [lam] + lambdas[:order - 1]
            if t_next == 0:
                x = node[0] if final_eps is None else x - final_eps
            else:
                lam_t = -torch.log(t_next)
                if t_after is not None and t_after == 0 and corrector == 'unic' and power > 0: # Into sigma_min, corrected with the final evaluation.
                    x_pred = step(x, lam, lam_t, history[:1], lambdas[:1])
                    if project is not None:
                        x_pred = project(x_pred, t_next)
                    pending = (denoise(x_pred, t_next), x_pred, t_next)
                    final_eps = x_pred - pending[0]
                    x = step(x, lam, lam_t, [pending] + history[:1], [lam_t] + lambdas[:1])
                elif t_after is not None and t_after == 0: # Into sigma_min: first order, no correction (as _dpmpp_multistep).
                    x = step(x, lam, lam_t, history[:1], lambdas[:1])
                elif corrector == 'unic' and t_after is not None:
                    x_pred = step(x, lam, lam_t, history, lambdas)
                    if project is not None:
                        x_pred = project(x_pred, t_next)
                    pending = (denoise(x_pred, t_next), x_pred, t_next)
                    x = step(x, lam, lam_t, [pending] + history, [lam_t] + lambdas)
                else:
                    x = step(x, lam, lam_t, history, lambdas)
        if project is not None:
            x = project(x, t_next)
    return x

#----------------------------------------------------------------------------
# SDE-DPM-Solver++(2M). The reverse SDE dx = 2 (x - D) / sigma dsigma +
# sqrt(2 sigma) dw (EDM Eq. 6 with beta = sigma'/sigma) reads, in lambda,
# dx = 2 (D - x) dlambda + noise. Its exponential integrator over a step h:
#   x(t) = e^-2h x(s) + K_0 D + K_1 D' + sigma_t sqrt(K_0) z,
#   K_0 = 1 - e^-2h, K_1 = 2 int_0^h e^-2u (h - u) du = h - K_0 / 2,
# with D' estimated from the previous output; the noise term keeps the
# marginal variance sigma_t^2 exact.

def _dpmpp_2m_sde(denoise, x, sigmas, randn_like, project):
    d_prev, lam_prev = None, None
    for t_cur, t_next in zip(sigmas[:-1], sigmas[1:]):
        d = denoise(x, t_cur)
        lam = -torch.log(t_cur)
        if t_next == 0:
            x = d
        else:
            h = -torch.log(t_next) - lam
            k0 = -torch.expm1(-2 * h)
            x = torch.exp(-2 * h) * x + k0 * d + t_next * k0.sqrt() * randn_like(x)
            if d_prev is not None:
                x = x + (h - 0.5 * k0) * (d - d_prev) / (lam - lam_prev)
        d_prev, lam_prev = d, lam
        if project is not None:
            x = project(x, t_next)
    return x

#----------------------------------------------------------------------------
# Run a solver from x = x(sigmas[0]) down the sequence `sigmas`.

def solve(
    denoise:        Denoiser,           # D(x; sigma): float64 [N, ...] and 0-d float64 sigma -> float64 [N, ...].
    x:              torch.Tensor,       # Initial state at sigmas[0], float64 [N, ...].
    sigmas:         torch.Tensor,       # Decreasing noise levels, normally ending in 0.
    solver:         str = 'heun',       # One of SOLVERS.
    randn_like:     Callable = torch.randn_like, # Noise source (per seed, for reproducibility).
    S_churn:        float = 0,          # EDM churn (heun, euler): stochasticity strength, 0 = deterministic.
    S_min:          float = 0,          # Lowest sigma where churn is applied.
    S_max:          float = float('inf'), # Highest sigma where churn is applied.
    S_noise:        float = 1,          # Noise inflation of the churn.
    round_sigma:    Callable | None = None, # The network's round_sigma (churned levels).
    project:        Projector | None = None, # x <- project(x, sigma) at the start and after every step (with UniC / AFS also at the predicted point).
    corrector:      str = 'none',       # One of CORRECTORS: 'unic' = UniC corrector (dpmpp_2m, dpmpp_3m).
    afs:            bool = False,       # Analytic first step (dpmpp_2m, dpmpp_3m): x(sigmas[0]) must be pure noise.
    sigma_data:     float = 0.5,        # AFS, gauss_*: std of the Gaussian whose denoiser is the first guess / the linear part (the network's sigma_data).
) -> torch.Tensor:
    """Integrate from sigmas[0] to sigmas[-1] with `solver`; returns float64."""
    if solver not in SOLVERS:
        raise ValueError(f'solver: unknown solver {solver!r} (choose from {", ".join(SOLVERS)})')
    if S_churn < 0:
        raise ValueError(f'S_churn must be >= 0, got {S_churn}')
    if S_churn > 0 and solver not in STOCHASTIC_CHURN_SOLVERS:
        raise ValueError(f'S_churn: churn applies to the {" and ".join(STOCHASTIC_CHURN_SOLVERS)} solvers; '
            f'{solver!r} is {"an SDE solver already" if solver.endswith("sde") else "a deterministic multistep solver"} (set S_churn=0)')
    if corrector not in CORRECTORS:
        raise ValueError(f'corrector: unknown corrector {corrector!r} (choose from {", ".join(CORRECTORS)})')
    if corrector != 'none' and solver not in MULTISTEP_SOLVERS:
        raise ValueError(f'corrector: the UniC corrector applies to the {", ".join(MULTISTEP_SOLVERS)} solvers, not {solver!r} (set corrector=\'none\')')
    if afs and solver not in MULTISTEP_SOLVERS:
        raise ValueError(f'afs: the analytic first step applies to the {", ".join(MULTISTEP_SOLVERS)} solvers, not {solver!r} (set afs=False)')
    if afs and not 0 <= sigma_data < float('inf'):
        raise ValueError(f'sigma_data must be >= 0 (the data std of the analytic first step), got {sigma_data}')
    sigmas = check_sigmas(sigmas).to(x.device)
    if afs and sigmas[1] == 0:
        raise ValueError('afs: the analytic first step needs a first step that ends at a noise level > 0 (at least 2 noise levels > 0)')
    x = x.to(torch.float64)
    if project is not None:
        x = project(x, sigmas[0])
    if solver in ('euler', 'heun'):
        return _euler_heun(denoise, x, sigmas, solver == 'heun', randn_like, S_churn, S_min, S_max, S_noise, round_sigma, project)
    if solver == 'dpmpp_2m_sde':
        return _dpmpp_2m_sde(denoise, x, sigmas, randn_like, project)
    if solver in GAUSS_SOLVERS:
        order, power = GAUSS_SOLVERS[solver]
        return _gauss_multistep(denoise, x, sigmas, order, project, corrector, afs, float(sigma_data), power)
    afs_guess = (lambda x, sigma: x * (sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2))) if afs else None
    return _dpmpp_multistep(denoise, x, sigmas, 2 if solver == 'dpmpp_2m' else 3, project, corrector, afs_guess)

#----------------------------------------------------------------------------
# Number of denoiser evaluations of a solver for a noise-level sequence.
# The UniC corrector costs none (it reuses the next step's evaluation);
# the analytic first step saves the one at sigmas[0], except for a single
# step (sigmas = [sigma_0, sigma_1], no final 0): its evaluation at sigma_1
# serves no following step, so it costs the one it replaces.

def num_evaluations(solver: str, sigmas: torch.Tensor, corrector: str = 'none', afs: bool = False) -> int:
    steps = len(sigmas) - 1
    if solver == 'heun': # No correction on a step that ends at sigma = 0.
        return 2 * steps - int(float(sigmas[-1]) == 0)
    return steps - int(bool(afs) and solver in MULTISTEP_SOLVERS and steps >= 2)

#----------------------------------------------------------------------------
