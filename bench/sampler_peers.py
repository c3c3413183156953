# medEDM: diffusion-model training toolkit for medical imaging.

"""Our few-step samplers beside the public peers, on the same denoisers,
latents, references and error metric as bench/sampler_accuracy.py (its
Gaussian, mixture and trained-network settings), every denoiser call counted
by one wrapper.

Peers (bench-only dependencies: `make bench-peers` installs the pinned wheels
of bench/requirements-peers.txt into ./.peers, which this script appends to
sys.path; nothing in the toolkit imports them):
  k-diffusion 0.1.1.post1 (only its k_diffusion/sampling.py, loaded by file:
            the package __init__ needs torchvision, kornia, ...): sample_euler,
            sample_heun, sample_lms (order 4), sample_dpmpp_2m, sample_dpm_2,
            sample_dpmpp_2s_ancestral with eta = 0 (deterministic 2S).
  diffusers 0.42.1: DPMSolverMultistepScheduler (dpmsolver++, order 2 and 3),
            UniPCMultistepScheduler (bh1 / bh2, order 2 / 3),
            DEISMultistepScheduler (order 2 / 3), EDMEulerScheduler and
            EDMDPMSolverMultistepScheduler (order 2 / 3).
  The VP schedulers of diffusers run with prediction_type='sample' (their
  model output is our D), their state x_vp = x / sqrt(1 + sigma^2), and their
  noise levels replaced after set_timesteps() by the ladder of the row (so
  every peer sees sigma_max = 80 .. sigma_min = 0.002, then 0, as ours); the
  EDM schedulers use their own Karras steps (the same ladder) and get
  F = (D - c_skip x) / c_out, inverting their preconditioning. The peers'
  SDE samplers (DPM++ 2M SDE, ancestral with eta > 0) do not follow the ODE
  and are not compared.

Peer time steps: `edm` (Karras rho = 7, what the peers use for EDM models)
and, for the multistep peers, `logsnr` (uniform in log sigma, DPM-Solver's
recommendation). Rows marked `*` run a peer on our logsnr_warped steps (a
hybrid: the steps are ours); they are shown, and the headline's best peer
is taken over the public rows and, apart, over all rows.

Before a peer's numbers count it must converge on the Gaussian closed form:
errors at 20, 40 and 80 evaluations finite, falling by at least 1.5x per
doubling, the last < 1e-2 (first-order peers: < 5e-2); a peer that fails is
printed and skipped. DEIS and UniPC bh1 give NaN on their step into sigma = 0
(log 0 in their coefficients); rows `+D` run them down to sigma_min and end
with x = D(x; sigma_min), as our solvers end (same NFE).

Headline per setting: at each NFE 6..20, our error (sampling preset `fast`)
and that of the best peer, and their ratio (> 1: ours more accurate); and the
NFE each needs to match EDM Heun at 35 NFE (the smallest NFE of the ladder
from which on every measured NFE has an error at most Heun's).

Examples:

\b
# Install the peers (pinned, into ./.peers) and run everything:
make bench-peers

\b
# Closed forms only (about a minute):
python bench/sampler_peers.py --settings gaussian,mixture

\b
# A trained snapshot (conditional networks take their cond from the snapshot's dataset):
python bench/sampler_peers.py --network demo-runs/<run>/network-snapshot-<kimg>.pkl --batch 4 --settings network

\b
# A tiny 3-D volume network (bench/sampler_tiny3d.py trains one):
python bench/sampler_tiny3d.py --outdir /tmp/tiny3d
python bench/sampler_peers.py --network /tmp/tiny3d/tiny3d.pkl --batch 8 --settings network
"""

import importlib.util
import os
import sys
import time
import types
import warnings

import click
import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sampler_accuracy as acc # pylint: disable=wrong-import-position
from training import sampling # pylint: disable=wrong-import-position
from training import solvers # pylint: disable=wrong-import-position

LADDER = [4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 22, 25, 30, 35, 40, 50, 60]
HEADLINE_NFE = list(range(6, 21))
GOAL_NFE = (8, 10, 12, 15)
HEUN_STEPS = 18 # 35 NFE.

#----------------------------------------------------------------------------
# Loading the peers (bench-only).

def load_peers(peers_dir: str) -> tuple:
    warnings.filterwarnings('ignore', message='__array_wrap__ must accept context', category=DeprecationWarning) # diffusers' DEIS under numpy 2.
    if os.path.isdir(peers_dir) and peers_dir not in sys.path:
        sys.path.append(peers_dir) # Appended: the venv's own packages (torch, numpy) win.
    try:
        import diffusers # pylint: disable=import-outside-toplevel
    except ImportError as err:
        raise click.ClickException(f'diffusers not found ({err}); run `make bench-peers` or pip install the pins of '
            f'bench/requirements-peers.txt into {peers_dir}') from None
    path = None
    for p in sys.path:
        if os.path.isfile(os.path.join(p, 'k_diffusion', 'sampling.py')):
            path = os.path.join(p, 'k_diffusion', 'sampling.py')
            break
    if path is None:
        raise click.ClickException('k_diffusion/sampling.py not found; run `make bench-peers`')
    # k_diffusion/sampling.py alone: its package's utils (torchvision) and the ODE/SDE
    # helpers of its likelihood / Brownian-tree code are stubbed; the samplers compared need none of them.
    stubs = {}
    pkg = types.ModuleType('k_diffusion')
    pkg.__path__ = []
    utils = types.ModuleType('k_diffusion.utils')
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    pkg.utils = utils
    stubs.update({'k_diffusion': pkg, 'k_diffusion.utils': utils})
    for name in ('torchdiffeq', 'torchsde'):
        if importlib.util.find_spec(name) is None:
            mod = types.ModuleType(name)
            mod.odeint = None
            mod.BrownianTree = None
            stubs[name] = mod
    saved = {k: sys.modules.get(k) for k in stubs}
    sys.modules.update(stubs)
    try:
        spec = importlib.util.spec_from_file_location('k_diffusion.sampling', path)
        kdiff = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(kdiff)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return diffusers, kdiff

#----------------------------------------------------------------------------
# Peer runners: f(denoise, latents, sigmas) -> x at sigma = 0. `sigmas` is the
# ladder (N levels > 0, then 0); the state starts at latents * sigmas[0].

def kdiff_runner(kdiff, name, **kwargs):
    fn = getattr(kdiff, name)
    def run(denoise, latents, sigmas):
        model = lambda x, sigma: denoise(x, sigma.reshape(-1)[0].to(torch.float64))
        return fn(model, latents * sigmas[0], sigmas, disable=True, **kwargs)
    return run

def diffusers_runner(diffusers, cls_name, edm=False, final_denoise=False, **config):
    cls = getattr(diffusers, cls_name)
    def run(denoise, latents, sigmas):
        if final_denoise: # The scheduler down to sigma_min, then x = D(x; sigma_min) (its own step into 0 gives NaN).
            x = run_to(denoise, latents, sigmas[:-1])
            return denoise(x * torch.sqrt(1 + sigmas[-2] ** 2), sigmas[-2])
        return run_to(denoise, latents, sigmas)
    def run_to(denoise, latents, sigmas):
        n = len(sigmas) - 1
        if edm:
            sched = cls(sigma_min=float(sigmas[-2]), sigma_max=float(sigmas[0]), sigma_data=0.5, rho=7.0, **config)
            sched.set_timesteps(n)
            assert torch.allclose(sched.sigmas.to(torch.float64), sigmas, rtol=1e-5), (sched.sigmas, sigmas) # Same Karras ladder.
        else:
            sched = cls(prediction_type='sample', **config)
            sched.set_timesteps(n)
            assert len(sched.timesteps) == n
            sched.sigmas = sigmas.clone() # Our ladder, ending at 0.
        x = latents * sigmas[0] / (1 if edm else torch.sqrt(1 + sigmas[0] ** 2))
        for i, t in enumerate(sched.timesteps):
            sigma = sigmas[i]
            if edm:
                d = denoise(x, sigma)
                skip = sched.precondition_outputs(x, torch.zeros_like(x), sigma.to(torch.float32))
                out = sched.precondition_outputs(torch.zeros_like(x), torch.ones_like(x), sigma.to(torch.float32))
                model_output = (d - skip) / out
                sched.scale_model_input(x, t)
            else:
                model_output = denoise(x * torch.sqrt(1 + sigma ** 2), sigma)
            x = sched.step(model_output, t, x).prev_sample.to(torch.float64)
        return x
    return run

def peer_rows(diffusers, kdiff) -> list[tuple]:
    """(name, runner, evaluations per step: 1 or 2, time steps) of every peer row."""
    K = lambda *a, **k: kdiff_runner(kdiff, *a, **k)
    D = lambda *a, **k: diffusers_runner(diffusers, *a, **k)
    rows = [
        ('kdiff euler', K('sample_euler'), 1), ('kdiff heun', K('sample_heun'), 2), ('kdiff lms4', K('sample_lms'), 1),
        ('kdiff dpm2', K('sample_dpm_2'), 2), ('kdiff dpmpp_2s(eta0)', K('sample_dpmpp_2s_ancestral', eta=0.0), 2),
        ('kdiff dpmpp_2m', K('sample_dpmpp_2m'), 1),
    ]
    multistep = [
        ('diffusers dpmpp_2m', D('DPMSolverMultistepScheduler', algorithm_type='dpmsolver++', solver_order=2)),
        ('diffusers dpmpp_3m', D('DPMSolverMultistepScheduler', algorithm_type='dpmsolver++', solver_order=3)),
        ('diffusers unipc bh1 o2', D('UniPCMultistepScheduler', solver_type='bh1', solver_order=2)),
        ('diffusers unipc bh1 o3', D('UniPCMultistepScheduler', solver_type='bh1', solver_order=3)),
        ('diffusers unipc bh1 o2 +D', D('UniPCMultistepScheduler', solver_type='bh1', solver_order=2, final_denoise=True)),
        ('diffusers unipc bh1 o3 +D', D('UniPCMultistepScheduler', solver_type='bh1', solver_order=3, final_denoise=True)),
        ('diffusers unipc bh2 o2', D('UniPCMultistepScheduler', solver_type='bh2', solver_order=2)),
        ('diffusers unipc bh2 o3', D('UniPCMultistepScheduler', solver_type='bh2', solver_order=3)),
        ('diffusers deis o2', D('DEISMultistepScheduler', solver_order=2)),
        ('diffusers deis o3', D('DEISMultistepScheduler', solver_order=3)),
        ('diffusers deis o2 +D', D('DEISMultistepScheduler', solver_order=2, final_denoise=True)),
        ('diffusers deis o3 +D', D('DEISMultistepScheduler', solver_order=3, final_denoise=True)),
    ]
    out = [(name, fn, per, 'edm') for name, fn, per in rows]
    out += [(name, fn, 1, 'edm') for name, fn in multistep]
    for cls in ('EDMEulerScheduler', 'EDMDPMSolverMultistepScheduler'):
        if hasattr(diffusers, cls):
            if cls == 'EDMEulerScheduler':
                out.append(('diffusers edm_euler', D(cls, edm=True), 1, 'edm'))
            else:
                out += [(f'diffusers edm_dpmpp_{o}m', D(cls, edm=True, solver_order=o), 1, 'edm') for o in (2, 3)]
        else:
            print(f'  (diffusers {diffusers.__version__} has no {cls}: skipped)')
    ends_at_zero = lambda name: not (('bh1' in name or 'deis' in name) and '+D' not in name)
    out += [(name, fn, 1, 'logsnr') for name, fn in multistep if ends_at_zero(name)]
    out += [(name, fn, 1, 'logsnr_warped') for name, fn in multistep if ends_at_zero(name)]
    out += [('kdiff dpmpp_2m', K('sample_dpmpp_2m'), 1, 'logsnr_warped'), ('kdiff lms4', K('sample_lms'), 1, 'logsnr_warped')]
    return out

#----------------------------------------------------------------------------
# Our rows: sampler options of sampling.sample (the preset resolved there), or
# a function of the setting's sigma_data giving them.

OUR_ROWS = [
    ('fast (preset)', dict(preset='fast')),
    ('previous fast (1.4 sd, last 0.007)', lambda sd: dict(solver='gauss_3m_sqrt', discretization='logsnr_warped', corrector='unic', afs=True,
        warp_k=0.5, sigma_c=1.4 * sd, sigma_min=0.007)),
    ('gauss_3m warped0.5+unic+afs (old fast)', dict(solver='gauss_3m', discretization='logsnr_warped', corrector='unic', afs=True, warp_k=0.5)),
    ('dpmpp_3m warped+unic+afs', dict(solver='dpmpp_3m', discretization='logsnr_warped', corrector='unic', afs=True)),
    ('dpmpp_2m warped+unic+afs', dict(solver='dpmpp_2m', discretization='logsnr_warped', corrector='unic', afs=True)),
    ('dpmpp_3m edm', dict(solver='dpmpp_3m')),
]

def our_runner(options, sigma_data=0.5):
    """Options: a dict, or a function of the setting's sigma_data giving one."""
    o = sampling.resolve_preset(dict(sampling.SAMPLER_DEFAULTS, **(options(sigma_data) if callable(options) else options)))
    def run(denoise, latents, sigmas):
        return solvers.solve(denoise, latents * sigmas[0], sigmas, o['solver'], corrector=o['corrector'], afs=o['afs'], sigma_data=sigma_data)
    run.options = o
    return run

def our_ladder(o, nfe, sigma_min, sigma_max, sigma_data):
    n = nfe + 1 if o['afs'] else nfe
    level = lambda key: sampling.preset_level(key, o[key], o.get('preset'), sigma_data, nfe) # As sample() (a preset's multiple of sigma_data).
    sigma_min = max(sigma_min, level('sigma_min')) # The option, raised to the bench's (the peers') sigma_min.
    return sampling.sigma_steps(n, sigma_min, sigma_max, o['discretization'], rho=o['rho'], sigma_c=level('sigma_c'), warp_k=o['warp_k'])

def peer_ladder(disc, per_step, nfe, sigma_min, sigma_max, sigma_data):
    if per_step == 2:
        if nfe % 2 == 0:
            return None
        n = (nfe + 1) // 2 # 2N - 1 evaluations (no correction into 0).
    else:
        n = nfe
    return sampling.sigma_steps(n, sigma_min, sigma_max, disc, sigma_c=sigma_data)

#----------------------------------------------------------------------------
# One row of errors against NFE (every call counted).

def measure(fn, ladder_fn, denoise, latents, ref, nfes, target=None, stop_after_match=False):
    errors = {}
    run_len = 0
    for nfe in nfes:
        sigmas = ladder_fn(nfe)
        if sigmas is None:
            continue
        calls = []
        counting = lambda x, sigma: calls.append(1) or denoise(x, sigma)
        with torch.no_grad(), np.errstate(all='ignore'): # DEIS / UniPC bh1 take log(0) on their own step into sigma = 0.
            x = fn(counting, latents.to(torch.float64), sigmas)
        if len(calls) != nfe:
            raise AssertionError(f'{nfe} evaluations expected, {len(calls)} counted')
        err = acc.rel_error(x.to(torch.float64), ref)
        errors[nfe] = err if np.isfinite(err) else float('inf')
        if target is not None and stop_after_match and nfe > max(HEADLINE_NFE):
            run_len = run_len + 1 if errors[nfe] <= target else 0
            if run_len >= 3:
                break
    return errors

def nfe_to_match(errors: dict, target: float):
    matched = None
    for nfe in sorted(errors):
        if errors[nfe] <= target * (1 + 1e-9):
            matched = nfe if matched is None else matched
        else:
            matched = None
    return matched

#----------------------------------------------------------------------------
# Correctness check of a peer on the Gaussian closed form.

def check_peer(fn, per_step, disc, order1: bool) -> tuple[bool, list]:
    s = 0.5
    latents = torch.randn([64, 16], dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    exact = latents * 80 * s / np.sqrt(s ** 2 + 80 ** 2)
    nfes = [21, 41, 81] if per_step == 2 else [20, 40, 80]
    try:
        errors = measure(fn, lambda nfe: peer_ladder(disc, per_step, nfe, 0.002, 80, s), acc.gaussian_denoiser(s), latents, exact, nfes)
    except Exception as err: # pylint: disable=broad-except
        return False, [f'{type(err).__name__}: {err}']
    e = [errors[n] for n in nfes]
    ok = all(np.isfinite(e)) and e[0] > 1.5 * e[1] > 2.25 * e[2] and e[2] < (5e-2 if order1 else 1e-2)
    return ok, e

#----------------------------------------------------------------------------
# One setting: all rows, the table and the headline.

def fmt(e):
    return ' inf  ' if not np.isfinite(e) else f'{e:.1e}'

def evaluate(name, denoise, latents, ref, peers, sigma_min=0.002, sigma_max=80, sigma_data=0.5, early_stop=False):
    heun = acc.rel_error(solvers.solve(denoise, latents.to(torch.float64) * sigma_max,
        sampling.sigma_steps(HEUN_STEPS, sigma_min, sigma_max, 'edm'), 'heun'), ref)
    print(f'\n== {name}: relative RMS error vs NFE (EDM Heun @ 35 NFE: {heun:.2e})')
    print(f'  {"row":<38s} ' + ' '.join(f'{n:>7d}' for n in LADDER) + '   match')
    results = {}
    for label, options in OUR_ROWS:
        fn = our_runner(options, sigma_data)
        errors = measure(fn, lambda nfe: our_ladder(fn.options, nfe, sigma_min, sigma_max, sigma_data), denoise, latents, ref, LADDER,
            heun, early_stop)
        results[('ours', label)] = errors
    for label, fn, per_step, disc in peers:
        errors = measure(fn, lambda nfe: peer_ladder(disc, per_step, nfe, sigma_min, sigma_max, sigma_data), denoise, latents, ref, LADDER,
            heun, early_stop)
        results[('peer' if disc != 'logsnr_warped' else 'hybrid', f'{label} / {disc}' + ('*' if disc == 'logsnr_warped' else ''))] = errors
    for (kind, label), errors in results.items():
        m = nfe_to_match(errors, heun)
        print(f'  {label:<38s} ' + ' '.join(f'{fmt(errors[n]) if n in errors else "":>7s}' for n in LADDER) +
            f'   {">" + str(max(errors)) if m is None else m}')
    return heun, results

def headline(name, heun, results) -> dict:
    ours = results[('ours', OUR_ROWS[0][0])]
    out = dict(ratio={}, best={}, best_all={})
    print(f'\n  {name}: ours = {OUR_ROWS[0][0]}; ratio = best peer error / our error (> 1: ours more accurate)')
    line_r, line_p, line_a = [], [], []
    for nfe in HEADLINE_NFE:
        public = [(e[nfe], label) for (kind, label), e in results.items() if kind == 'peer' and nfe in e]
        every = public + [(e[nfe], label) for (kind, label), e in results.items() if kind == 'hybrid' and nfe in e]
        best, best_label = min(public)
        best_all, best_all_label = min(every)
        out['ratio'][nfe] = best / ours[nfe]
        out['best'][nfe] = (best, best_label)
        out['best_all'][nfe] = (best_all, best_all_label)
        line_r.append(f'{nfe}:{best / ours[nfe]:.2f}x')
        line_p.append(f'{nfe}:{best_label}')
        line_a.append(f'{nfe}:{best_all / ours[nfe]:.2f}x')
    print('    ratio (public peers):  ' + ' '.join(line_r))
    print('    ratio (incl. hybrids): ' + ' '.join(line_a))
    print('    best public peer:      ' + '; '.join(line_p))
    match = {label: nfe_to_match(e, heun) for (kind, label), e in results.items()}
    order = sorted(match.items(), key=lambda kv: 999 if kv[1] is None else kv[1])
    print('    NFE to match Heun@35:  ' + ', '.join(f'{label} {">" + str(LADDER[-1]) if m is None else m}' for label, m in order))
    ok_all = all(r >= 1 for r in out['ratio'].values())
    ok_goal = all(out['ratio'][n] >= 1.2 for n in GOAL_NFE)
    print(f'    at least as accurate as the best public peer at every NFE 6-20: {"yes" if ok_all else "NO"}; '
        f'>= 1.2x at NFE {", ".join(map(str, GOAL_NFE))}: {"yes" if ok_goal else "NO"}')
    return out

#----------------------------------------------------------------------------
# A given snapshot: latents of its sample shape, its cond from the snapshot's dataset.

def snapshot_setting(path, batch, gen):
    from training import network_snapshot # pylint: disable=import-outside-toplevel
    net, snapshot = network_snapshot.load_network(path)
    shape = sampling.sample_shape(net)
    cond = labels = None
    loss_fn = snapshot.get('loss_fn')
    if getattr(net, 'cond_channels', 0) and hasattr(loss_fn, 'latent_batch'): # A latent network (3-D LDM): dataset items -> frozen encoder.
        import generate # pylint: disable=import-outside-toplevel
        dataset = generate.condition_dataset(None, snapshot)
        items = torch.utils.data.default_collate([dataset[i] for i in range(batch)])
        with torch.no_grad():
            cond = loss_fn.latent_batch(items, snapshot.get('frozen'))['cond'].to(torch.float32)
    elif getattr(net, 'cond_channels', 0):
        import generate # pylint: disable=import-outside-toplevel
        conds = generate.load_conditions(net, dict(cond_dataset=None, cond_indices=f'0-{batch - 1}', class_idx=None, format='npz'), snapshot)
        cond = torch.as_tensor(conds['cond'])
        labels = None if conds['labels'] is None else torch.as_tensor(conds['labels'])
    elif getattr(net, 'label_dim', 0):
        labels = torch.eye(net.label_dim)[torch.arange(batch) % net.label_dim]
    den = sampling.make_denoiser(net, class_labels=labels, cond=cond)
    denoise = lambda x, sigma: den(x, sigma)
    latents = torch.randn([batch, *shape], dtype=torch.float64, generator=gen)
    return net, denoise, latents

#----------------------------------------------------------------------------

@click.command()
@click.option('--peers-dir', help='Folder with the peers installed (pip --target)', metavar='DIR', default=os.path.join(ROOT, '.peers'), show_default=True)
@click.option('--network', 'network_pkl', help='Network snapshot for the network setting (default: train a small one)', metavar='PKL', default=None)
@click.option('--train-steps', help='Training steps of the small network', metavar='INT', type=int, default=300, show_default=True)
@click.option('--batch', help='Latents of the network setting', metavar='INT', type=int, default=16, show_default=True)
@click.option('--ref-steps', help='Steps of the network reference (dpmpp_3m, EDM steps)', metavar='INT', type=int, default=1000, show_default=True)
@click.option('--settings', help='Settings to run (gaussian includes the s = 1 Gaussian)', metavar='LIST', default='gaussian,mixture,network', show_default=True)
@click.option('--ours-only', help='Our rows only (no peers needed, no headline)', is_flag=True)
@click.option('--peers', 'peer_filter', help='Only the peer rows whose "name / steps" contains one of these (comma-separated)', metavar='LIST', default='')
@click.option('--max-nfe', help='Longest NFE of the ladder', metavar='INT', type=int, default=LADDER[-1], show_default=True)
@click.option('--threads', help='torch threads', metavar='INT', type=int, default=1, show_default=True)
def main(peers_dir, network_pkl, train_steps, batch, ref_steps, settings, ours_only, peer_filter, max_nfe, threads):
    """Our samplers beside the public peers; see the module docstring."""
    torch.set_num_threads(threads)
    t0 = time.time()
    diffusers, kdiff = load_peers(peers_dir) if not ours_only else (None, None)
    peers = []
    if not ours_only:
        print(f'peers: diffusers {diffusers.__version__}, k-diffusion sampling.py from {os.path.dirname(os.path.dirname(kdiff.__file__))}')
        # Correctness of each peer on the Gaussian closed form.
        print('\n== peer check on the Gaussian closed form (errors at 20 / 40 / 80 NFE; 21 / 41 / 81 for 2-evaluation steps)')
    LADDER[:] = [n for n in LADDER if n <= max(max_nfe, max(HEADLINE_NFE))]
    wanted = [v.strip() for v in peer_filter.split(',') if v.strip()]
    for label, fn, per_step, disc in ([] if ours_only else peer_rows(diffusers, kdiff)):
        if wanted and not any(w in f'{label} / {disc}' for w in wanted):
            continue
        ok, e = check_peer(fn, per_step, disc, order1='euler' in label)
        print(f'  {"ok  " if ok else "FAIL"} {label + " / " + disc:<40s} ' + ' '.join(fmt(v) if isinstance(v, float) else str(v) for v in e)
            + ('' if ok else '  -> skipped'))
        if ok:
            peers.append((label, fn, per_step, disc))

    settings = {v.strip() for v in settings.split(',') if v.strip()}
    if not settings <= {'gaussian', 'mixture', 'network'}:
        raise click.BadParameter(f'unknown settings {sorted(settings - {"gaussian", "mixture", "network"})}', param_hint='--settings')
    summary = {}
    gen = torch.Generator().manual_seed(1) # Latents drawn in a fixed order (gaussian, mixture, network) whatever runs.
    s = 0.5
    latents = torch.randn([128, 16], dtype=torch.float64, generator=gen)
    exact = latents * 80 * s / np.sqrt(s ** 2 + 80 ** 2)
    if 'gaussian' in settings:
        summary['gaussian'] = evaluate('gaussian (s = 0.5 = sigma_data; closed form, exact solution)', acc.gaussian_denoiser(s), latents, exact, peers)
        s = 1.0 # Not the sigma_data (0.5) that our solvers assume: gauss_* are not exact here.
        exact = latents * 80 * s / np.sqrt(s ** 2 + 80 ** 2)
        summary['gaussian-1'] = evaluate('gaussian (s = 1.0, twice sigma_data; closed form)', acc.gaussian_denoiser(s), latents, exact, peers)

    denoise = acc.mixture_denoiser()
    latents = torch.randn([128, 16], dtype=torch.float64, generator=gen)
    if 'mixture' in settings:
        reference = acc.run(denoise, latents, 'heun', 'edm', 1000)
        summary['mixture'] = evaluate('mixture (closed-form denoiser; reference: 1000 Heun steps)', denoise, latents, reference, peers)

    if 'network' in settings:
        t1 = time.time()
        if network_pkl is None:
            net = acc.train_network(train_steps)
            denoise = acc.network_denoiser(net)
            latents = torch.randn([batch, 1, 16, 16], dtype=torch.float64, generator=gen)
            what = f'SongUNet 16x16 trained {train_steps} steps on blobs'
        else:
            net, denoise, latents = snapshot_setting(network_pkl, batch, gen)
            what = f'{network_pkl}, sample shape {list(latents.shape[1:])}'
        sigma_min, sigma_max = max(0.002, float(net.sigma_min)), min(80.0, float(net.sigma_max))
        with torch.no_grad():
            reference = solvers.solve(denoise, latents * sigma_max, sampling.sigma_steps(ref_steps, sigma_min, sigma_max, 'edm'), 'dpmpp_3m')
        name = f'network ({what}; reference: {ref_steps} dpmpp_3m steps, {time.time() - t1:.0f} s)'
        summary['network'] = evaluate(name, denoise, latents, reference, peers, sigma_min, sigma_max, float(getattr(net, 'sigma_data', 0.5)),
            early_stop=True)

    print(f'\nHeadline ({time.time() - t0:.0f} s)')
    for name, (heun, res) in ([] if ours_only else summary.items()):
        headline(name, heun, res)

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------
