# medEDM: diffusion-model training toolkit for medical imaging.

"""`evaluate.py anomaly`: the reference's evaluation of unsupervised anomaly
detection (training/anomaly/metrics.py) for trained networks (patched DDPM,
cDDPM) and two non-learned baselines, on the built (or a user's real) test
sets:

    intensity      the image intensity itself as the anomaly score (Meissen et al. 2021)
    mean_healthy   |x - mean of the healthy training volumes|
    oracle         |x - the same subject rendered without its lesion| (split CSV column healthy_path):
                   the score of the exact lesion-free subject (a healthy reconstruction's target; a
                   reference point, not a bound), which needs the synthetic ground truth
                   (dataset_tool.py anomaly-data); evaluated only when every volume of every
                   evaluated set has one, so never for real data
    <name>         |x - x_hat| of a network (--network name=snapshot.pkl)

For every test set (Brats21, MSLUB: <data-root>/splits/<set>_{val,test}.csv)
the threshold of each method is chosen on the pooled voxels of the set's
validation split, then applied to its test split. Writes metrics.json
(per set, per lesion kind and pooled: mean +- std over volumes of Dice,
AUPRC, AUROC, best Dice; paired differences of each network against each
baseline with their standard errors), metrics.csv (one row per method and
volume), NIfTI anomaly maps and reconstructions with the input's affine and
header, PNG panels (input / reconstruction / anomaly map / ground truth) and
ROC and PR curves. Every input is checked before anything is written."""

import os

import click
import numpy as np
import torch

from torch_utils import persistence
from training import evaluation
from training import image_io
from training import metrics as metrics_mod
from training.anomaly import dataset as anomaly_dataset
from training.anomaly import inference
from training.anomaly import loss as anomaly_loss
from training.anomaly import metrics as M

BASELINES = ('intensity', 'mean_healthy')
ORACLE = 'oracle'
ORACLE_NOTE = ('reference point, not a method or a bound: |x - the same synthetic subject rendered without its lesion and mass effect '
    '(healthy_path, independent noise)|; needs the synthetic ground truth, absent for real data')

#----------------------------------------------------------------------------
# Inputs, checked.

def parse_networks(specs) -> dict[str, str]:
    out = {}
    for spec in specs:
        name, sep, path = spec.partition('=')
        if not sep:
            name, path = os.path.basename(os.path.dirname(spec)) or 'net', spec
        if not name.replace('_', '').replace('-', '').isalnum() or name in BASELINES or name == ORACLE or name in out:
            raise ValueError(f'--network {spec!r}: expected NAME=PKL with a new name of letters, digits, - and _ (not {", ".join(BASELINES + (ORACLE,))})')
        if not os.path.isfile(path):
            raise ValueError(f'--network {name}: snapshot not found: {path}')
        out[name] = path
    return out

def load_sets(root: str, sets, max_volumes) -> dict:
    out = {}
    for name in sets:
        out[name] = {split: anomaly_dataset.load_split(os.path.join(root, 'splits', f'{name}_{split}.csv'), max_volumes) for split in ('val', 'test')}
    return out

def parse_select(specs, nets: dict) -> dict[str, list[list[int]]]:
    """--select-t NAME=T[,T...][;T[,T...]...] -> {name: candidate lists of reference steps}."""
    out = {}
    for spec in specs:
        name, sep, value = spec.partition('=')
        if not sep or name not in nets or name in out:
            raise ValueError(f'--select-t {spec!r}: expected NAME=CANDIDATES for one of the --network names ({", ".join(nets) or "none given"}), once each')
        try:
            cands = [[int(t) for t in c.split(',')] for c in value.split(';') if c.strip()]
        except ValueError:
            cands = []
        if not cands or any(not 1 <= t <= 1000 for c in cands for t in c):
            raise ValueError(f'--select-t {spec!r}: expected candidates of reference steps in 1..1000 such as 300;500;700 or 250,500,750;150,300,450')
        out[name] = cands
    return out

def check_network(name: str, path: str, net, loss_fn, shape) -> dict:
    h, w, _ = shape
    want = list(getattr(net, 'img_shape', []))
    if want != [1, h, w]:
        raise ValueError(f'--network {name}: {path} takes slices of shape {want[1:] if want else "?"}, the test volumes have {h} x {w} slices '
            f'(volumes {list(shape)}); train at this size or resample the volumes')
    if not hasattr(loss_fn, 'test_sigmas'):
        raise ValueError(f'--network {name}: {path} is not an anomaly-detection snapshot (its loss is {type(loss_fn).__name__})')
    method = inference.method_of(loss_fn)
    if method['kind'] == 'patched':
        method['boxes'] = inference.grid_boxes(h, w, method['patch_size'], method['stride'])
    return method

#----------------------------------------------------------------------------
# Scores of every method for a list of cases: (H, W, S) arrays in [0, 1] units.

def baseline_scores(cases, mean_healthy, oracle: bool = False):
    out = dict(intensity=[c['image'] for c in cases], mean_healthy=[np.abs(c['image'] - mean_healthy) for c in cases])
    if oracle:
        out[ORACLE] = [np.abs(c['image'] - c['healthy']).astype(np.float32) for c in cases]
    return out

def has_oracle(data: dict) -> tuple[bool, str | None]:
    """(every volume of every set and split has a healthy rendering, why not when only some have one)."""
    cases = [(s, c) for s, splits in data.items() for split in splits.values() for c in split]
    missing = [f'{s}: {c["img_path"]}' for s, c in cases if c.get('healthy') is None]
    if missing and len(missing) < len(cases):
        return False, f'{ORACLE}: left out, {len(missing)} of {len(cases)} volumes have no healthy_path (first: {missing[0]})'
    return not missing, None

@torch.inference_mode()
def network_scores(net, method, cases, device, batch: int, seed: int, first_index: int):
    vols = [anomaly_dataset.to_slices(c['image']).to(device) for c in cases]
    active = [anomaly_dataset.to_slices(M.erode_mask(c['brain'])) > 0 for c in cases] # Jobs outside the eroded brain are skipped.
    recos = inference.reconstruct_volumes(net, vols, method, seed=seed, batch=batch, first_index=first_index, active=active)
    recos = [anomaly_dataset.from_slices(r.clamp(-1, 1)) for r in recos]
    return [np.abs(c['image'] - r).astype(np.float32) for c, r in zip(cases, recos)], recos

#----------------------------------------------------------------------------
# Evaluation of one method on one test set.

def val_threshold(val_scores, val_cases) -> tuple[float, float]:
    """(threshold, Dice at it) of the bisection on the pooled validation voxels."""
    val_maps = [M.anomaly_map(s, c['brain']) for s, c in zip(val_scores, val_cases)]
    return M.find_threshold(np.concatenate([m.ravel() for m in val_maps]), np.concatenate([c['seg'].ravel() for c in val_cases]))

def select_sigmas(net, method, candidates, val, device, batch, seed, offset, reference_sigma) -> tuple[dict, list, list]:
    """The candidate test steps with the best validation Dice (at its own validation threshold; ties: the
    first): (method with their sigmas, every candidate's validation Dice, the chosen one's validation scores)."""
    tried = []
    for cand in candidates:
        m = dict(method, sigmas=reference_sigma(cand))
        scores, _ = network_scores(net, m, val, device, batch, seed, offset)
        tried.append(dict(test_t=cand, sigmas=m['sigmas'], val_dice=val_threshold(scores, val)[1], scores=scores))
    best = max(range(len(tried)), key=lambda k: (tried[k]['val_dice'], -k))
    best_scores = tried[best]['scores']
    for t in tried:
        del t['scores']
    return dict(method, sigmas=tried[best]['sigmas']), tried, best_scores

def evaluate_method(val_scores, val_cases, test_scores, test_cases) -> tuple[float, list[dict], list[np.ndarray]]:
    threshold, _ = val_threshold(val_scores, val_cases)
    rows, maps = [], []
    for s, c in zip(test_scores, test_cases):
        amap = M.anomaly_map(s, c['brain'])
        rows.append(dict(case=c['case'], kind=c['kind'], threshold=threshold, **M.volume_metrics(amap, c['seg'], threshold)))
        maps.append(amap)
    return threshold, rows, maps

def summary_of(rows: list[dict], methods, networks, baselines=BASELINES) -> dict:
    keys = ('dice', 'auprc', 'auroc', 'best_dice')
    groups = {'pooled': rows, **{f'kind:{k}': [r for r in rows if r['kind'] == k] for k in sorted({r['kind'] for r in rows})},
        **{f'set:{s}': [r for r in rows if r['set'] == s] for s in sorted({r['set'] for r in rows})}}
    out = {}
    for group, grows in groups.items():
        by = {m: sorted([r for r in grows if r['method'] == m], key=lambda r: (r['set'], r['case'])) for m in methods}
        entry = {m: {k: M.summarize([r[k] for r in by[m]]) for k in keys} for m in methods}
        entry['paired'] = {f'{n}-{b}': {k: M.paired([r[k] for r in by[n]], [r[k] for r in by[b]]) for k in ('dice', 'auprc', 'auroc')}
            for n in networks for b in baselines}
        out[group] = entry
    return out

#----------------------------------------------------------------------------
# Pictures: panels and curves.

def write_panel(path, case, recos: dict, maps: dict) -> None:
    """Rows: one per method: input | reconstruction (input for baselines) | anomaly map | ground truth, at the slice of most lesion."""
    k = int(np.argmax(case['seg'].sum(axis=(0, 1)))) if case['seg'].any() else case['image'].shape[2] // 2
    vmax = max(float(max(m[:, :, k].max() for m in maps.values())), 1e-6)
    tiles = []
    for name, amap in maps.items():
        reco = recos.get(name, case['image'])
        tiles += [case['image'][:, :, k], reco[:, :, k], amap[:, :, k] / vmax, case['seg'][:, :, k].astype(np.float32)]
    images = np.stack(tiles)[:, None] * 2 - 1
    image_io.save_image_grid(images, path, drange=(-1, 1), grid_size=(4, len(maps)))

def write_curves(outdir: str, set_name: str, curves: dict) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve
    for kind in ('roc', 'pr'):
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        for name, (score, gt) in curves.items():
            if kind == 'roc':
                x, y, _ = roc_curve(gt, score)
            else:
                y, x, _ = precision_recall_curve(gt, score)
            ax.plot(x, y, label=name)
        ax.set_xlabel('false positive rate' if kind == 'roc' else 'recall')
        ax.set_ylabel('true positive rate' if kind == 'roc' else 'precision')
        ax.set_title(f'{set_name} test voxels ({kind.upper()})')
        ax.legend(fontsize=8)
        fig.tight_layout()
        persistence.atomic_write(os.path.join(outdir, f'{kind}-{set_name}.png'), lambda f: fig.savefig(f, dpi=100, format='png'))
        plt.close(fig)

def write_nifti_like(path: str, data: np.ndarray, img_path: str) -> None:
    from generate import write_nifti # The one NIfTI writer: float32 with the source file's affine and header.
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_nifti(path, np.asarray(data, dtype=np.float32)[None], dict(nifti_path=img_path))

#----------------------------------------------------------------------------

@click.command()
@click.option('--data-root', help='Data root with splits/*.csv (dataset_tool.py anomaly-data, or real data)', metavar='DIR', type=str, required=True)
@click.option('--network', 'network_specs', help='NAME=network-snapshot.pkl (repeatable)', metavar='NAME=PKL', type=str, multiple=True)
@click.option('--sets', help='Test sets: <set>_val.csv and <set>_test.csv in splits/', metavar='LIST', type=str, default='Brats21,MSLUB', show_default=True)
@click.option('--train-split', help='Healthy volumes of the mean_healthy baseline [default: splits/IXI_train_fold0.csv]', metavar='CSV', type=str, default=None)
@click.option('--outdir', help='Where to write the results', metavar='DIR', type=str, required=True)
@click.option('--batch', help='Slices (x boxes x sigmas) per forward pass', metavar='INT', type=click.IntRange(min=1), default=256, show_default=True)
@click.option('--seed', help='Noise field of test volume i: seed + i', metavar='INT', type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--max-volumes', help='Use at most this many volumes per split', metavar='INT', type=click.IntRange(min=1), default=None)
@click.option('--panels', help='PNG panels of the first N test volumes per set', metavar='INT', type=click.IntRange(min=0), default=4, show_default=True)
@click.option('--maps/--no-maps', help='Write NIfTI anomaly maps and reconstructions', default=True, show_default=True)
@click.option('--steps', help='Solver steps from sigma_test (1 = the reference\'s one x0 call; > 1: Euler, training/sampling.py; not patched)', metavar='INT', type=click.IntRange(min=1), default=1, show_default=True)
@click.option('--select-t', 'select_specs', help='NAME=CANDIDATES: choose the test steps of network NAME on the validation split, e.g. pddpm=300;500;700', metavar='NAME=LIST', type=str, multiple=True)
def command(data_root, network_specs, sets, train_split, outdir, batch, seed, max_volumes, panels, maps, steps, select_specs):
    """Anomaly maps, thresholds and metrics of networks and baselines (the reference's pipeline)."""
    evaluation.check_outdir(outdir)
    device = evaluation.default_device()
    set_names = [s.strip() for s in sets.split(',') if s.strip()]
    if not set_names:
        raise ValueError('--sets: no test set given')
    nets = parse_networks(network_specs)
    select = parse_select(select_specs, nets)
    data = load_sets(data_root, set_names, max_volumes)
    shape = data[set_names[0]]['test'][0]['image'].shape
    for s in set_names:
        for split, cases in data[s].items():
            for c in cases:
                if c['image'].shape != shape:
                    raise ValueError(f'{c["img_path"]} has shape {list(c["image"].shape)}, {data[set_names[0]]["test"][0]["img_path"]} {list(shape)}: the test volumes must share one size')
            if not any(c['seg'].any() for c in cases):
                raise ValueError(f'{s}_{split}: no volume has lesion voxels (seg_path): nothing to detect or to choose a threshold on')
    train = anomaly_dataset.load_split(train_split or os.path.join(data_root, 'splits', 'IXI_train_fold0.csv'), max_volumes)
    if any(c['image'].shape != shape for c in train):
        raise ValueError(f'--train-split: the healthy volumes must have the test volumes\' shape {list(shape)}')
    mean_healthy = np.mean([c['image'] for c in train], axis=0)
    oracle, why_not = has_oracle(data)
    if why_not:
        print(why_not)
    baselines = list(BASELINES) + ([ORACLE] if oracle else [])
    loaded = {}
    for name, path in nets.items():
        net, snapshot = evaluation.load_network(path, False, device)
        method = check_network(name, path, net, snapshot.get('loss_fn'), shape)
        if steps > 1 and method['kind'] == 'patched':
            raise ValueError(f'--steps {steps}: --network {name} is a patched DDPM; its boxes are reconstructed with one call (--steps 1)')
        loaded[name] = (net, dict(method, steps=steps))
    methods = baselines + list(nets)

    # Scores, thresholds, per-volume metrics (nothing written yet).
    rows, results = [], {}
    offset = 0
    for s in set_names:
        val, test = data[s]['val'], data[s]['test']
        scores = {split: baseline_scores(cases, mean_healthy, oracle) for split, cases in (('val', val), ('test', test))}
        recos = {}
        results[s] = dict(thresholds={}, maps={}, recos=recos, selection={})
        for name, (net, method) in loaded.items():
            if name in select:
                method, tried, scores['val'][name] = select_sigmas(net, method, select[name], val, device, batch, seed, offset, anomaly_loss.reference_sigma)
                results[s]['selection'][name] = dict(chosen=method['sigmas'], tried=tried)
            else:
                scores['val'][name], _ = network_scores(net, method, val, device, batch, seed, offset)
            scores['test'][name], recos[name] = network_scores(net, method, test, device, batch, seed, offset + len(val))
        offset += len(val) + len(test)
        for m in methods:
            threshold, mrows, mmaps = evaluate_method(scores['val'][m], val, scores['test'][m], test)
            results[s]['thresholds'][m] = threshold
            results[s]['maps'][m] = mmaps
            rows += [dict(method=m, set=s, **r) for r in mrows]

    # Write.
    evaluation.make_outdir(outdir)
    summary = dict(data_root=data_root, sets=set_names, methods=methods, networks=nets, baselines=baselines, volume_shape=list(shape),
        **({ORACLE: ORACLE_NOTE} if oracle else {}),
        sigmas={name: method['sigmas'] for name, (_, method) in loaded.items()}, steps=steps,
        selection={s: results[s]['selection'] for s in set_names if results[s]['selection']},
        thresholds={s: results[s]['thresholds'] for s in set_names}, volumes={s: len(data[s]['test']) for s in set_names},
        results=summary_of(rows, methods, list(nets), baselines))
    metrics_mod.write_metrics(outdir, summary, rows)
    for s in set_names:
        test = data[s]['test']
        curves = {m: (np.concatenate([a.ravel() for a in results[s]['maps'][m]]), np.concatenate([c['seg'].ravel() for c in test])) for m in methods}
        write_curves(outdir, s, curves)
        for i, c in enumerate(test):
            if maps:
                for m in methods:
                    write_nifti_like(os.path.join(outdir, 'maps', m, f'{c["case"]}.nii.gz'), results[s]['maps'][m][i], c['img_path'])
                for name in nets:
                    write_nifti_like(os.path.join(outdir, 'reconstructions', name, f'{c["case"]}.nii.gz'), results[s]['recos'][name][i], c['img_path'])
            if i < panels:
                os.makedirs(os.path.join(outdir, 'panels'), exist_ok=True)
                panel_recos = {n: results[s]['recos'][n][i] for n in nets} | ({ORACLE: c['healthy']} if oracle else {})
                write_panel(os.path.join(outdir, 'panels', f'{c["case"]}.png'), c, panel_recos,
                    {m: results[s]['maps'][m][i] for m in methods})
    pooled = summary['results']['pooled']
    for m in methods:
        print(f'{m:>14s}: Dice {pooled[m]["dice"]["mean"]:.3f} +- {pooled[m]["dice"]["std"]:.3f}  AUPRC {pooled[m]["auprc"]["mean"]:.3f}  '
            f'AUROC {pooled[m]["auroc"]["mean"]:.3f}  best Dice {pooled[m]["best_dice"]["mean"]:.3f}' + ('  (the lesion-free subject: synthetic ground truth)' if m == ORACLE else ''))
    print(f'Wrote {outdir}/metrics.json, metrics.csv, maps, panels and curves')

#----------------------------------------------------------------------------
