# medEDM: diffusion-model training toolkit for medical imaging.

"""Sampler accuracy against network evaluations (NFE), for every deterministic
solver of training/solvers.py, in three settings measured in the same run:

  gaussian  data N(0, s^2 I): the ideal denoiser and the exact solution of the
            probability-flow ODE are known in closed form (no reference run).
  mixture   a Gaussian mixture in 16 dimensions (8 components, std 0.3):
            closed-form ideal denoiser, nonlinear trajectories; reference =
            the same ODE solved with 1000 EDM Heun steps (1999 NFE).
  network   a small SongUNet (EDMPrecond, 16x16, 1 channel) trained on the fly
            (--train-steps Adam steps at batch 32, about 30 s on 2 idle cores; a
            fixed count, so the result does not depend on the machine's load)
            on smooth random blobs; reference
            = 1000 steps of DPM-Solver++(3M) on the same latents (1000 NFE;
            --ref heun for 1000 Heun steps, 1999 NFE, slower).

Error = RMS(x - x_ref) / RMS(x_ref) at sigma = 0, over a batch of latents; all
solvers start from the same latents (x = latents * sigma_max). The SDE solver
(dpmpp_2m_sde) and EDM's churn are stochastic: they do not follow the ODE and
are not compared.

Rows: solver / time steps / options. Time steps: EDM's (rho = 7) unless a row
says logsnr (uniform in log sigma) or logsnr_warped (log sigma warped by asinh
around sigma_c = 0.5 with k = 0.3, defaults chosen on other settings than these).
Options: +unic = UniC corrector (no extra evaluation), +afs = analytic first
step (no evaluation at sigma_max, so a row with +afs runs N = NFE + 1 levels;
its guess is the Gaussian denoiser with sigma_data = 0.5). NFE always counts
denoiser calls: this bench asserts, for every cell, that the number of calls
its own counter sees equals the NFE of the ladder (solvers.num_evaluations is
checked against a counter separately, in tests/test_sampling_solvers.py).

Headline: the NFE each solver needs to reach the error of EDM Heun at 35 NFE
(18 steps, EDM's CIFAR-10 setting) -- the smallest NFE of the ladder from which
on every measured NFE has an error at most Heun's -- and the ratio 35 / NFE.
Goal: DPM-Solver++(2M) or (3M) within 12 evaluations.

Examples:

\b
# Everything (about 2-3 minutes on 2 idle cores):
python bench/sampler_accuracy.py

\b
# Closed forms only (seconds):
python bench/sampler_accuracy.py --no-network

\b
# The longer-trained network, with oracle time steps at 12 NFE (about 25 minutes):
python bench/sampler_accuracy.py --train-steps 1500 --oracle-nfe 12
"""

import os
import sys
import time

import click
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from training import loss as loss_mod
from training import networks
from training import sampling
from training import solvers

HEUN_STEPS = 18 # 35 NFE.
GOAL_NFE = 12
LADDER = [4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 18, 20, 22, 25, 30, 35, 40, 50, 60]
ROWS = [('euler', 'edm', ''), ('heun', 'edm', ''), ('dpmpp_2m', 'edm', ''), ('dpmpp_3m', 'edm', ''), ('dpmpp_2m', 'logsnr', ''),
    ('dpmpp_3m', 'logsnr', ''), ('dpmpp_3m', 'logsnr_warped', ''), ('dpmpp_2m', 'logsnr_warped', 'unic'),
    ('dpmpp_3m', 'logsnr_warped', 'unic'), ('dpmpp_2m', 'logsnr_warped', 'unic+afs'), ('dpmpp_3m', 'logsnr_warped', 'unic+afs')]

#----------------------------------------------------------------------------
# Closed-form denoisers.

def gaussian_denoiser(s: float):
    return lambda x, sigma: s ** 2 / (s ** 2 + sigma ** 2) * x

def mixture_denoiser(dim: int = 16, components: int = 8, std: float = 0.3, seed: int = 0):
    # D(x; sigma) = sum_k w_k(x) [mu_k + s^2/(s^2+sigma^2) (x - mu_k)], w_k = posterior of component k.
    mu = torch.rand([components, dim], dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    def denoise(x, sigma):
        var = std ** 2 + sigma ** 2
        diff = x[:, None, :] - mu[None]
        w = torch.softmax(-0.5 * (diff ** 2).sum(-1) / var, dim=1)
        return (w[..., None] * (mu[None] + std ** 2 / var * diff)).sum(1)
    return denoise

#----------------------------------------------------------------------------
# A small network trained on smooth random blobs in [-1, 1].

def blobs(n: int, res: int, rng: np.random.Generator) -> torch.Tensor:
    yy, xx = np.mgrid[:res, :res] / res
    cx, cy = rng.uniform(0.25, 0.75, (2, n, 1, 1))
    r = rng.uniform(0.12, 0.3, (n, 1, 1))
    soft = 1 / (1 + np.exp(-(r ** 2 - (xx - cx) ** 2 - (yy - cy) ** 2) * 150))
    return torch.as_tensor(soft * 2 - 1, dtype=torch.float32)[:, None]

def train_network(num_steps: int, res: int = 16, batch: int = 32, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = networks.EDMPrecond(img_resolution=res, img_channels=1, model_type='SongUNet', model_channels=16, channel_mult=[1, 2],
        num_blocks=1, attn_resolutions=[], dropout=0.0)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    loss_fn = loss_mod.EDMLoss()
    data = blobs(4096, res, rng)
    for _ in range(num_steps):
        idx = torch.as_tensor(rng.integers(len(data), size=batch))
        loss = loss_fn(net, {'image': data[idx]}).sum() / batch
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval().requires_grad_(False)

def network_denoiser(net):
    def denoise(x, sigma):
        with torch.no_grad():
            return net(x.to(torch.float32), sigma.to(torch.float32)).to(torch.float64)
    return denoise

#----------------------------------------------------------------------------
# Solve from the latents with a solver, a discretisation and N steps.

def run(denoise, latents, solver, disc, num_steps, options='', sigma_min=0.002, sigma_max=80):
    sigmas = sampling.sigma_steps(num_steps, sigma_min, sigma_max, disc)
    kwargs = dict(corrector='unic' if 'unic' in options else 'none', afs='afs' in options)
    return solvers.solve(denoise, latents.to(torch.float64) * sigmas[0], sigmas, solver, **kwargs)

def rel_error(x, ref) -> float:
    return float((x - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())

def steps_for_nfe(solver: str, nfe: int, options: str = '') -> int | None:
    if solver == 'heun':
        return (nfe + 1) // 2 if nfe % 2 == 1 else None # NFE = 2N - 1.
    return nfe + 1 if 'afs' in options else nfe # AFS: NFE = N - 1.

#----------------------------------------------------------------------------
# Error table and headline for one setting. Without `full`, a row stops once
# it has matched Heun at 35 NFE on three ladder points in a row (saves evaluations).

def evaluate(name: str, denoise, latents, ref, full: bool) -> dict:
    target = rel_error(run(denoise, latents, 'heun', 'edm', HEUN_STEPS), ref)
    print(f'\n== {name}: relative RMS error vs NFE (EDM Heun @ 35 NFE: {target:.2e})')
    headline = {}
    for solver, disc, options in ROWS:
        cells, matched, run_len = [], None, 0
        for nfe in LADDER:
            n = steps_for_nfe(solver, nfe, options)
            if n is None or (solver == 'heun' and not full and nfe not in (5, 9, 15, 25, 35)):
                continue
            if solver == 'euler' and not full and nfe not in (10, 20, 35, 60):
                continue
            calls = []
            counting = lambda x, sigma: calls.append(1) or denoise(x, sigma)
            err = rel_error(run(counting, latents, solver, disc, n, options), ref)
            assert len(calls) == nfe, (solver, disc, options, nfe, len(calls)) # NFE = true denoiser calls.
            cells.append(f'{nfe}:{err:.1e}')
            if err <= target * (1 + 1e-9):
                matched = nfe if matched is None else matched
                run_len += 1
            else:
                matched, run_len = None, 0
            if not full and run_len >= 3:
                break
        headline[(solver, disc, options)] = matched
        print(f'  {solver:<9s} {disc + ("+" + options if options else ""):<22s} ' + ' '.join(cells))
    return headline

def print_headline(name: str, headline: dict) -> None:
    parts = []
    for (solver, disc, options), nfe in headline.items():
        label = (solver if disc == 'edm' else f'{solver}/{disc}') + (f'+{options}' if options else '')
        parts.append(f'{label} {">" + str(LADDER[-1]) if nfe is None else nfe}' + ('' if nfe is None else f' ({35 / nfe:.1f}x)'))
    # The goal names DPM-Solver++ 2M / 3M: report the plain solvers (any steps) and, apart, the rows
    # that add the UniC corrector (UniPC-style) or the analytic first step.
    def best(plain: bool) -> str:
        rows = [(nfe, key) for key, nfe in headline.items() if key[0] in ('dpmpp_2m', 'dpmpp_3m') and nfe is not None
            and (key[2] == '') == plain]
        if not rows:
            return 'NOT met'
        nfe, (solver, disc, options) = min(rows)
        return f'{"met" if nfe <= GOAL_NFE else "NOT met"} ({nfe}, {solver}/{disc}{"+" + options if options else ""})'
    print(f'  {name:<8s} NFE to match Heun@35: ' + ', '.join(parts))
    print(f'  {"":<8s} goal (DPM-Solver++ 2M/3M within {GOAL_NFE}): plain solvers {best(True)}; with corrector / AFS {best(False)}')

#----------------------------------------------------------------------------
# Oracle time steps: for a solver and an NFE, the noise levels that minimise
# the error on the evaluated latents themselves (Nelder-Mead over the N - 1
# step lengths in log sigma, as softmax proportions of log(sigma_max /
# sigma_min); start: uniform log sigma). Not a sampler (it is fitted to the
# answer): it bounds what any time discretisation can give that solver.

ORACLE_ROWS = [('dpmpp_2m', ''), ('dpmpp_3m', ''), ('dpmpp_2m', 'unic'), ('dpmpp_3m', 'unic')]

def oracle_sigmas(theta: np.ndarray, sigma_min: float = 0.002, sigma_max: float = 80) -> torch.Tensor:
    w = np.exp(theta - theta.max())
    log_sigma = np.log(sigma_max) - np.concatenate([[0], np.cumsum(w / w.sum())]) * np.log(sigma_max / sigma_min)
    return torch.cat([torch.as_tensor(np.exp(log_sigma)), torch.zeros(1, dtype=torch.float64)])

def oracle(name: str, denoise, latents, ref, nfes: list[int]) -> None:
    import scipy.optimize
    target = rel_error(run(denoise, latents, 'heun', 'edm', HEUN_STEPS), ref)
    print(f'  {name}: oracle time steps (fitted to these latents), error vs Heun@35 {target:.2e}')
    for solver, options in ORACLE_ROWS:
        cells = []
        for nfe in nfes:
            kwargs = dict(corrector='unic' if options == 'unic' else 'none')
            error = lambda theta: rel_error(solvers.solve(denoise, latents.to(torch.float64) * 80, oracle_sigmas(theta), solver, **kwargs), ref)
            fit = scipy.optimize.minimize(lambda theta: np.log(error(theta)), np.zeros(nfe - 1), method='Nelder-Mead',
                options=dict(maxfev=150 * nfe, xatol=1e-3, fatol=1e-4))
            best = float(np.exp(fit.fun))
            cells.append(f'{nfe}:{best:.1e}{"" if best <= target else " (above)"}')
        print(f'    {solver}{"+" + options if options else "":<6s} ' + ' '.join(cells))

#----------------------------------------------------------------------------

@click.command()
@click.option('--train-steps', help='Training steps of the small network', metavar='INT', type=int, default=300, show_default=True)
@click.option('--batch', help='Latents per setting (network)', metavar='INT', type=int, default=16, show_default=True)
@click.option('--ref', help='Reference solver of the network setting', type=click.Choice(['dpmpp_3m', 'heun']), default='dpmpp_3m', show_default=True)
@click.option('--network/--no-network', help='Include the trained network', default=True, show_default=True)
@click.option('--threads', help='torch threads', metavar='INT', type=int, default=1, show_default=True)
@click.option('--oracle-nfe', help='Also fit oracle time steps at these NFE (mixture, network; minutes each)', metavar='LIST', default='', show_default=True)
def main(train_steps, batch, ref, network, threads, oracle_nfe):
    """Accuracy of the samplers against network evaluations; see the module docstring."""
    torch.set_num_threads(threads)
    t0 = time.time()
    headlines = {}
    gen = torch.Generator().manual_seed(1)

    # Gaussian: exact solution x(0) = x(sigma_max) s / sqrt(s^2 + sigma_max^2).
    s = 0.5
    latents = torch.randn([512, 16], dtype=torch.float64, generator=gen)
    exact = latents * 80 * s / np.sqrt(s ** 2 + 80 ** 2)
    headlines['gaussian'] = evaluate('gaussian (closed form, exact solution)', gaussian_denoiser(s), latents, exact, full=True)

    # Gaussian mixture: 1000 Heun steps as reference.
    denoise = mixture_denoiser()
    latents = torch.randn([128, 16], dtype=torch.float64, generator=gen)
    reference = run(denoise, latents, 'heun', 'edm', 1000)
    headlines['mixture'] = evaluate('mixture (closed-form denoiser; reference: 1000 Heun steps)', denoise, latents, reference, full=True)
    nfes = [int(v) for v in oracle_nfe.split(',') if v.strip()]
    if nfes:
        oracle('mixture', denoise, latents, reference, nfes)

    # Small trained network.
    if network:
        t1 = time.time()
        net = train_network(train_steps)
        denoise = network_denoiser(net)
        latents = torch.randn([batch, 1, 16, 16], dtype=torch.float64, generator=gen)
        t2 = time.time()
        reference = run(denoise, latents, ref, 'edm', 1000)
        name = (f'network (SongUNet 16x16 trained {train_steps} steps / {t2 - t1:.0f} s on blobs; '
            f'reference: 1000 {ref} steps, {time.time() - t2:.0f} s)')
        headlines['network'] = evaluate(name, denoise, latents, reference, full=False)
        if nfes:
            oracle('network', denoise, latents, reference, nfes)

    print(f'\nHeadline ({time.time() - t0:.0f} s): evaluations needed to match EDM Heun at 35 NFE (35 / NFE in brackets)')
    for name, headline in headlines.items():
        print_headline(name, headline)

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------
