# medEDM: diffusion-model training toolkit for medical imaging.

"""`evaluate.py diffmic`: the DCG prior alone and DiffMIC (prior + label
diffusion) side by side on a split of class-folder data, with calibration and
uncertainty.

    --network   a snapshot, or a run directory: then every snapshot in it is
                evaluated on the validation split (never the test split) and the
                one of highest accuracy (latest on ties) is used; the choice and
                all validation accuracies go to selection.json
    --split     the split reported (test by default; train: the training part
                without augmentation, to compare fit and generalisation)
    --estimator DiffMIC's class probabilities from its S samples: vote shares
                (default) or the clipped mean (training/diffmic/inference.py)
    --calibrate temperature scaling fitted on the validation split (NLL), one
                temperature per model, applied unchanged to the reported split:
                metrics `dcg_ts`, `diffmic_ts` (`ensemble_ts`) beside the
                uncalibrated ones (training/diffmic/calibration.py); only with
                --split test (never fitted on the split it is judged on)
    --ensemble  another DCG snapshot file (repeatable; trained on the same
                train/validation split): the deep-ensemble baseline
                (Lakshminarayanan et al. 2017), the mean of the prior's y_fusion
                and theirs, reported as `ensemble` beside the DCG and DiffMIC.
                DiffMIC is the prior plus a second trained network, so an
                ensemble of the prior with a second DCG is the yardstick of
                what a second network adds without label diffusion

A DCG-stage snapshot gives the DCG's metrics (and the ensemble's) only. Outputs
(atomic): metrics.json / metrics.csv (summary: each model's metrics, the paired
accuracy differences with their standard errors, the paired ECE differences
with their bootstrap standard errors, accuracy of the most and least certain
halves; rows: per image), confusion-<model>.csv / .png, reliability.png,
panel.png (images of the split with the DCG's and DiffMIC's class distributions)."""

import glob
import io
import json
import os

import click
import numpy as np
import torch

from torch_utils import persistence
from training import evaluation
from training import metrics as engine_metrics
from training import sampling
from training import stages
from training.diffmic import calibration
from training.diffmic import inference
from training.diffmic import metrics
from training.diffmic.dataset import ClassFolderDataset
from training.diffmic.dcg import DCGNet
from training.diffmic.loss import LabelEDMLoss, check_classes

#----------------------------------------------------------------------------
# A DiffMIC snapshot: (diffusion net or None, DCG).

def load_model(path: str, device: torch.device, option: str = '--network') -> tuple:
    if not os.path.isfile(path):
        raise ValueError(f'{option}: snapshot not found: {path}')
    snapshot = stages.load_snapshot(path, device)
    ema, loss_fn = snapshot['ema'], snapshot.get('loss_fn')
    if isinstance(loss_fn, LabelEDMLoss):
        dcg = snapshot['frozen'].get(loss_fn.dcg)
        if not isinstance(dcg, DCGNet):
            raise ValueError(f'{option}: {path} has no frozen DCG {loss_fn.dcg!r}')
        return ema, dcg, snapshot
    if isinstance(ema, DCGNet):
        return None, ema, snapshot
    raise ValueError(f'{option}: {path} is neither a DiffMIC label-diffusion nor a DCG snapshot')

def guided_map_of(snapshot: dict) -> int:
    """The guided map size np of a label-diffusion snapshot's loss (0: off, and for DCG snapshots)."""
    return int(getattr(snapshot.get('loss_fn'), 'guided_map', 0))

def make_dataset(snapshot: dict, data: str | None, split: str, split_file: str | None) -> ClassFolderDataset:
    dropped = ('_target_', 'augment', 'split') + (() if split == 'train' else ('max_size',)) # The training part: the images trained on.
    kwargs = {k: v for k, v in dict(snapshot.get('dataset_kwargs') or {}).items() if k not in dropped}
    if data is not None:
        kwargs['path'] = data
    if split_file is not None:
        kwargs['split_file'] = split_file
    if 'path' not in kwargs:
        raise ValueError('--data: the snapshot names no dataset; give the class-folder root')
    return ClassFolderDataset(split=split, augment=False, **kwargs)

def check_model(dcg, dataset: ClassFolderDataset, path: str, option: str = '--network') -> None:
    check_classes(dcg, dataset.label_dim, f'{option} {path}')
    if (dcg.img_channels, dcg.img_resolution) != (dataset.num_channels, dataset.resolution):
        raise ValueError(f'{option} {path}: the DCG takes {dcg.img_channels}x{dcg.img_resolution}px images, '
            f'the data are {dataset.num_channels}x{dataset.resolution}px')

#----------------------------------------------------------------------------
# The deep-ensemble baseline: the prior's DCG and other DCG snapshots, y_fusion averaged.

MODELS = (('dcg', 'prior'), ('ensemble', 'ensemble'), ('diffmic', 'probs')) # Name in the summary -> key of its probabilities in the outputs.
SPLIT_KEYS = ('split_file', 'val_fraction', 'split_seed', 'group_pattern') # What decides the train/validation split.

def load_ensemble(paths: tuple[str, ...], dcg: DCGNet, snapshot: dict, dataset: ClassFolderDataset, device: torch.device) -> list[DCGNet]:
    """The DCGs of the other ensemble members: each checked against the data and the evaluated snapshot's
    train/validation split (a member trained on part of the validation split would bias the temperature
    fitted there); none may have the weights of the prior or of another member."""
    members, ours = [], dict(snapshot.get('dataset_kwargs') or {})
    seen = stages.fingerprint({'the prior': dcg}) # {who: SHA-256 of the weights}
    for path in paths:
        _, member, member_snapshot = load_model(path, device, '--ensemble')
        check_model(member, dataset, path, '--ensemble')
        theirs = dict(member_snapshot.get('dataset_kwargs') or {})
        for key in SPLIT_KEYS:
            if theirs.get(key) != ours.get(key):
                raise ValueError(f'--ensemble {path}: trained with training.dataset.{key}={theirs.get(key)!r}, the evaluated '
                    f'snapshot with {ours.get(key)!r}; the members must share the train/validation split')
        digest = stages.fingerprint({path: member})[path]
        clash = next((who for who, d in seen.items() if d == digest), None)
        if clash is not None:
            raise ValueError(f'--ensemble {path}: its DCG has the same weights as {clash}; an ensemble needs separately '
                'trained DCGs (e.g. the DCG stage with another training.seed)')
        members.append(member)
        seen[path] = digest
    return members

def add_ensemble(out: dict, members: list[DCGNet], dataset: ClassFolderDataset, batch: int, device: torch.device) -> None:
    """out['ensemble'] = the mean of out['prior'] and the members' y_fusion on `dataset` (in dataset order)."""
    probs = [out['prior']] + [inference.predict(None, m, dataset, 1, 0, {}, batch, device)['prior'] for m in members]
    out['ensemble'] = np.mean(np.stack(probs), axis=0)

#----------------------------------------------------------------------------
# Checkpoint selection on the validation split.

def select_snapshot(run_dir: str, data, split_file, samples: int, seed: int, sampler: dict, batch: int, device, estimator: str) -> tuple[str, list, dict]:
    """-> (chosen path, validation accuracy of every snapshot, the chosen snapshot's validation outputs)."""
    paths = sorted(glob.glob(os.path.join(run_dir, 'network-snapshot-*.pkl')))
    if not paths:
        raise ValueError(f'--network: no network-snapshot-*.pkl in {run_dir}')
    scores, datasets, best = [], {}, None
    for i, path in enumerate(paths):
        net, dcg, snapshot = load_model(path, device)
        key = repr(sorted((snapshot.get('dataset_kwargs') or {}).items()))
        if key not in datasets: # Snapshots of one run share their data: read the images once.
            datasets[key] = make_dataset(snapshot, data, 'val', split_file)
        val = datasets[key]
        check_model(dcg, val, path)
        out = inference.predict(net, dcg, val, samples, seed, sampler, batch, device, estimator=estimator, guided_map=guided_map_of(snapshot))
        pred = (out['probs'] if net is not None else out['prior']).argmax(axis=1)
        scores.append(dict(path=path, val_accuracy=float((pred == val.class_idx).mean())))
        if best is None or scores[i]['val_accuracy'] >= scores[best[0]]['val_accuracy']: # Latest on ties.
            best = (i, out)
    return paths[best[0]], scores, best[1]

#----------------------------------------------------------------------------
# Plots (matplotlib, Agg), written atomically.

def _save_figure(fig, path: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format='png', dpi=110, bbox_inches='tight')
    persistence.atomic_write_bytes(path, buf.getvalue())

def plot_confusion(cm: np.ndarray, classes: list, title: str, path: str) -> None:
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(1.2 * len(classes) + 1.5, 1.2 * len(classes) + 1))
    ax.imshow(cm, cmap='Blues')
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, str(cm[i, j]), ha='center', va='center', color='black' if cm[i, j] < cm.max() / 2 else 'white')
    ax.set_xticks(range(len(classes)), classes, rotation=45)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel('predicted')
    ax.set_ylabel('true')
    ax.set_title(title)
    _save_figure(fig, path)
    plt.close(fig)

def plot_reliability(y_true, models: dict, path: str, num_bins: int = 15) -> None:
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], 'k--', lw=1, label='perfect calibration')
    for name, probs in models.items():
        b = metrics.calibration_bins(y_true, probs, num_bins)
        keep = b['count'] > 0
        ax.plot(b['confidence'][keep], b['accuracy'][keep], 'o-', label=f'{name} (ECE {metrics.expected_calibration_error(y_true, probs, num_bins):.3f})')
    ax.set_xlabel('confidence (max probability)')
    ax.set_ylabel('accuracy')
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc='upper left', fontsize=8)
    _save_figure(fig, path)
    plt.close(fig)

def plot_panel(dataset, out: dict, path: str, count: int = 8) -> None:
    import matplotlib.pyplot as plt
    idx = np.linspace(0, len(dataset) - 1, min(count, len(dataset))).round().astype(int)
    k = dataset.label_dim
    fig, axes = plt.subplots(2, len(idx), figsize=(1.9 * len(idx), 4.2), squeeze=False)
    for col, i in enumerate(idx):
        image = (dataset[i]['image'] + 1) / 2
        axes[0, col].imshow(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0), cmap='gray', vmin=0, vmax=1)
        axes[0, col].set_title(f'true: {dataset.classes[dataset.class_idx[i]]}', fontsize=8)
        axes[0, col].axis('off')
        ax = axes[1, col]
        ax.bar(np.arange(k) - 0.2, out['prior'][i], width=0.4, label='DCG prior')
        if 'probs' in out:
            ax.bar(np.arange(k) + 0.2, out['probs'][i], width=0.4, label='DiffMIC')
            ax.set_title(f'spread {out["spread"][i]:.2f}', fontsize=8)
        ax.set_xticks(range(k), dataset.classes, rotation=90, fontsize=7)
        ax.set_ylim(0, 1)
    axes[1, 0].legend(fontsize=6)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)

#----------------------------------------------------------------------------
# Summary and rows.

def confidence_halves(y_true, pred, certainty) -> dict:
    """Accuracy of the more and the less certain half (by `certainty`, higher = more certain)."""
    order = np.argsort(-np.asarray(certainty), kind='stable')
    half = len(order) // 2
    hi, lo = order[:max(half, 1)], order[max(half, 1):]
    acc = lambda s: float((pred[s] == y_true[s]).mean()) if len(s) else float('nan')
    return dict(accuracy_certain_half=acc(hi), accuracy_uncertain_half=acc(lo), n_certain=len(hi), n_uncertain=len(lo))

def calibrate_summary(summary: dict, out: dict, val_y, val_out: dict, y, num_bins: int) -> None:
    """Temperatures fitted on the validation outputs (val_y, val_out); calibrated metrics of `out` into summary."""
    models = [(name, key) for name, key in MODELS if key in out]
    temps = {name: calibration.fit_temperature(val_y, val_out[key]) for name, key in models}
    summary['calibration'] = dict(method='temperature scaling of log-probabilities, NLL', fitted_on='val', images=int(len(val_y)),
        **{f'temperature_{name}': t for name, t in temps.items()})
    for name, key in models:
        out[f'{key}_ts'] = calibration.apply_temperature(out[key], temps[name])
        summary[f'{name}_ts'] = metrics.classification_metrics(y, out[f'{key}_ts'], out[key].shape[1], num_bins)
    if 'probs' in out:
        summary['paired_ece_diffmic_minus_dcg_ts'] = metrics.paired_ece(y, out['probs_ts'], out['prior_ts'], num_bins)
    if 'probs' in out and 'ensemble' in out:
        summary['paired_ece_diffmic_minus_ensemble_ts'] = metrics.paired_ece(y, out['probs_ts'], out['ensemble_ts'], num_bins)

def summarize(dataset, out: dict, num_bins: int) -> tuple[dict, list]:
    y, k = dataset.class_idx, dataset.label_dim
    summary = dict(split=dataset.split_name, images=len(y), classes=dataset.classes, class_counts=dataset.class_counts().tolist(),
        dcg=metrics.classification_metrics(y, out['prior'], k, num_bins))
    summary['dcg'].update(confidence_halves(y, out['prior'].argmax(1), out['prior'].max(1)))
    if 'probs' in out:
        summary['diffmic'] = metrics.classification_metrics(y, out['probs'], k, num_bins)
        summary['diffmic'].update(confidence_halves(y, out['pred'], -out['spread']))
        summary['diffmic']['mean_spread'] = float(out['spread'].mean())
        summary['diffmic']['mean_agreement'] = float(out['agreement'].mean())
        summary['paired_accuracy_diffmic_minus_dcg'] = metrics.paired_accuracy(y, out['pred'], out['prior'].argmax(1))
        summary['paired_ece_diffmic_minus_dcg'] = metrics.paired_ece(y, out['probs'], out['prior'], num_bins)
    if 'ensemble' in out:
        summary['ensemble'] = metrics.classification_metrics(y, out['ensemble'], k, num_bins)
        summary['ensemble'].update(confidence_halves(y, out['ensemble'].argmax(1), out['ensemble'].max(1)))
        summary['paired_accuracy_ensemble_minus_dcg'] = metrics.paired_accuracy(y, out['ensemble'].argmax(1), out['prior'].argmax(1))
        summary['paired_ece_ensemble_minus_dcg'] = metrics.paired_ece(y, out['ensemble'], out['prior'], num_bins)
        if 'probs' in out:
            summary['paired_accuracy_diffmic_minus_ensemble'] = metrics.paired_accuracy(y, out['pred'], out['ensemble'].argmax(1))
            summary['paired_ece_diffmic_minus_ensemble'] = metrics.paired_ece(y, out['probs'], out['ensemble'], num_bins)
    rows = []
    for i in range(len(y)):
        row = dict(file=dataset.files[i], true=dataset.classes[y[i]], pred_dcg=dataset.classes[out['prior'][i].argmax()])
        row.update({f'p_dcg_{c}': float(out['prior'][i, j]) for j, c in enumerate(dataset.classes)})
        if 'ensemble' in out:
            row.update(pred_ensemble=dataset.classes[out['ensemble'][i].argmax()])
            row.update({f'p_ensemble_{c}': float(out['ensemble'][i, j]) for j, c in enumerate(dataset.classes)})
        if 'probs' in out:
            row.update(pred_diffmic=dataset.classes[out['pred'][i]], spread=float(out['spread'][i]), agreement=float(out['agreement'][i]))
            row.update({f'p_diffmic_{c}': float(out['probs'][i, j]) for j, c in enumerate(dataset.classes)})
        rows.append(row)
    return summary, rows

def write_outputs(outdir: str, dataset, out: dict, summary: dict, rows: list) -> None:
    engine_metrics.write_metrics(outdir, summary, rows)
    models = {name: out[key] for name, key in MODELS if key in out}
    calibrated = {f'{name} (T fitted on val)': out[f'{key}_ts'] for name, key in MODELS if f'{key}_ts' in out}
    for name in models:
        cm = np.asarray(summary[name]['confusion_matrix'])
        text = 'true\\pred,' + ','.join(dataset.classes) + '\n' + ''.join(f'{c},' + ','.join(str(v) for v in cm[i]) + '\n' for i, c in enumerate(dataset.classes))
        persistence.atomic_write_bytes(os.path.join(outdir, f'confusion-{name}.csv'), text.encode('utf-8'))
        plot_confusion(cm, dataset.classes, f'{name}: {dataset.split_name} accuracy {summary[name]["accuracy"]:.3f}', os.path.join(outdir, f'confusion-{name}.png'))
    plot_reliability(dataset.class_idx, dict(models, **calibrated), os.path.join(outdir, 'reliability.png'))
    plot_panel(dataset, out, os.path.join(outdir, 'panel.png'))

#----------------------------------------------------------------------------

NAMES = dict(dcg='DCG', diffmic='DiffMIC', ensemble='ensemble')

@click.command()
@evaluation.common_options
@click.option('--data', help='Class-folder root (default: the snapshot\'s training data)', metavar='DIR', type=str, default=None)
@click.option('--split', help='Split to report', type=click.Choice(['test', 'val', 'train']), default='test', show_default=True)
@click.option('--split-file', help='Split JSON (default: the snapshot\'s)', metavar='PATH', type=str, default=None)
@click.option('--samples', help='Label samples per image (S)', metavar='INT', type=click.IntRange(min=1), default=8, show_default=True)
@click.option('--bins', help='Calibration bins of the ECE', metavar='INT', type=click.IntRange(min=1), default=15, show_default=True)
@click.option('--estimator', help='DiffMIC probabilities from the samples', type=click.Choice(list(inference.ESTIMATORS)), default='votes', show_default=True)
@click.option('--calibrate/--no-calibrate', help='Temperature scaling fitted on the validation split (with --split test)', default=True, show_default=True)
@click.option('--ensemble', 'ensemble_pkls', help='Deep-ensemble baseline: another DCG snapshot, averaged with the prior (repeatable)', metavar='PKL', multiple=True)
@evaluation.sampler_options
def command(network_pkl, trust_edm_pickle, outdir, batch, seed, data, split, split_file, samples, bins, estimator, calibrate, ensemble_pkls, sampler):
    """DiffMIC: DCG prior vs label diffusion (accuracy, balanced accuracy, macro P/R/F1, AUC OvR/OvO, kappa, ECE)."""
    evaluation.check_outdir(outdir)
    device = evaluation.default_device()
    torch.set_grad_enabled(False)
    selection, val_out = None, None
    for path in ensemble_pkls: # Before the selection, which takes a while.
        if not os.path.isfile(path):
            raise ValueError(f'--ensemble: snapshot not found: {path}')
    if os.path.isdir(network_pkl):
        chosen, scores, val_out = select_snapshot(network_pkl, data, split_file, samples, seed, sampler, batch, device, estimator)
        selection = dict(selected=chosen, on='val', estimator=estimator, scores=scores)
        network_pkl = chosen
    net, dcg, snapshot = load_model(network_pkl, device)
    guided_map = guided_map_of(snapshot)
    if net is not None:
        inference.check_guided_samples(samples, guided_map)
    dataset = make_dataset(snapshot, data, split, split_file)
    check_model(dcg, dataset, network_pkl)
    members = load_ensemble(ensemble_pkls, dcg, snapshot, dataset, device)
    val = make_dataset(snapshot, data, 'val', split_file) if calibrate and split == 'test' else None
    if val is not None and val_out is None:
        val_out = inference.predict(net, dcg, val, samples, seed, sampler, batch, device, estimator=estimator, guided_map=guided_map)
    if val is not None and members:
        add_ensemble(val_out, members, val, batch, device)
    evaluation.make_outdir(outdir)
    if selection is not None:
        persistence.atomic_write_bytes(os.path.join(outdir, 'selection.json'), json.dumps(selection, indent=1).encode('utf-8'))
    out = inference.predict(net, dcg, dataset, samples, seed, sampler, batch, device, estimator=estimator, guided_map=guided_map)
    if members:
        add_ensemble(out, members, dataset, batch, device)
    summary, rows = summarize(dataset, out, bins)
    if val is not None:
        calibrate_summary(summary, out, val.class_idx, val_out, dataset.class_idx, bins)
    if members:
        summary['ensemble_members'] = [network_pkl, *ensemble_pkls]
    summary.update(network=network_pkl, samples=samples, sampler=sampling.network_levels(sampler, net), seed=seed, estimator=estimator, guided_map=guided_map)
    write_outputs(outdir, dataset, out, summary, rows)
    for name, _ in MODELS:
        if name in summary:
            s = summary[name]
            print(f'{name:8s} {split}: accuracy {s["accuracy"]:.4f}  balanced {s["balanced_accuracy"]:.4f}  F1 {s["f1_macro"]:.4f}  '
                f'AUC-OvR {s["auc_macro_ovr"]:.4f}  kappa-q {s["kappa_quadratic"]:.4f}  ECE {s["ece"]:.4f}  NLL {s["nll"]:.4f}')
        if f'{name}_ts' in summary:
            t = summary['calibration'][f'temperature_{name}']
            print(f'{name:8s} {split}, temperature {t:.3f} fitted on val: ECE {summary[name + "_ts"]["ece"]:.4f}  NLL {summary[name + "_ts"]["nll"]:.4f}')
    for a, b in (('diffmic', 'dcg'), ('ensemble', 'dcg'), ('diffmic', 'ensemble')):
        p = summary.get(f'paired_accuracy_{a}_minus_{b}')
        if p is not None:
            print(f'paired accuracy difference {NAMES[a]} - {NAMES[b]}: {p["diff"]:+.4f} +- {p["se"]:.4f} (SE; {p["a_only"]} vs {p["b_only"]} discordant)')
        for key, what in ((f'paired_ece_{a}_minus_{b}', ''), (f'paired_ece_{a}_minus_{b}_ts', ', both temperature-scaled')):
            if key in summary:
                print(f'paired ECE difference {NAMES[a]} - {NAMES[b]}{what}: {summary[key]["diff"]:+.4f} +- {summary[key]["se"]:.4f} (bootstrap SE)')
    print(f'Wrote {outdir}')

#----------------------------------------------------------------------------
