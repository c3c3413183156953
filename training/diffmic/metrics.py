# medEDM: diffusion-model training toolkit for medical imaging.

"""Classification metrics of DiffMIC's evaluation, computed globally over the
split (not averaged per batch, unlike DiffMIC v1's accuracy and kappa):
scikit-learn for accuracy, balanced accuracy, macro precision / recall / F1,
AUC (macro one-vs-rest and macro one-vs-one, reported separately), Cohen's
kappa (unweighted and quadratic) and the confusion matrix; the expected
calibration error (ECE) here.

Edge cases: precision / recall / F1 of a class never predicted (or absent)
count as 0 (zero_division=0), over all K classes; AUC is NaN unless every
class occurs in y_true (one-vs-rest and one-vs-one are undefined otherwise);
kappa is NaN where sklearn's is (a single class in both y_true and y_pred);
the NLL floors probabilities at NLL_FLOOR."""

import warnings

import numpy as np
from sklearn import metrics as skm

#----------------------------------------------------------------------------
# Expected calibration error (Guo et al. 2017): M equal-width bins of the
# confidence c = max_k p_k; bin b = (b/M, (b+1)/M] (the first bin includes 0);
# ECE = sum_b n_b / N |acc_b - conf_b|.

def calibration_bins(y_true: np.ndarray, probs: np.ndarray, num_bins: int = 15) -> dict:
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(np.float64)
    b = np.clip(np.ceil(conf * num_bins).astype(np.int64) - 1, 0, num_bins - 1)
    count = np.bincount(b, minlength=num_bins).astype(np.float64)
    acc = np.bincount(b, weights=correct, minlength=num_bins) / np.maximum(count, 1)
    mean_conf = np.bincount(b, weights=conf, minlength=num_bins) / np.maximum(count, 1)
    return dict(edges=np.linspace(0, 1, num_bins + 1), count=count, accuracy=acc, confidence=mean_conf)

def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, num_bins: int = 15) -> float:
    bins = calibration_bins(np.asarray(y_true), np.asarray(probs, dtype=np.float64), num_bins)
    return float((bins['count'] / max(len(y_true), 1) * np.abs(bins['accuracy'] - bins['confidence'])).sum())

#----------------------------------------------------------------------------

NLL_FLOOR = 1e-6 # Probabilities are floored here in the NLL (DiffMIC's vote shares can be exactly 0).

def classification_metrics(y_true, probs, num_classes: int, num_bins: int = 15) -> dict:
    """Metrics of class probabilities (N, K) against integer labels (N,); prediction = argmax."""
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    assert probs.shape == (len(y_true), num_classes) and len(y_true) > 0
    y_pred = probs.argmax(axis=1)
    labels = np.arange(num_classes)
    out = dict(
        accuracy            = skm.accuracy_score(y_true, y_pred),
        balanced_accuracy   = _quiet(skm.balanced_accuracy_score, y_true, y_pred),
        precision_macro     = skm.precision_score(y_true, y_pred, labels=labels, average='macro', zero_division=0),
        recall_macro        = skm.recall_score(y_true, y_pred, labels=labels, average='macro', zero_division=0),
        f1_macro            = skm.f1_score(y_true, y_pred, labels=labels, average='macro', zero_division=0),
        auc_macro_ovr       = float('nan'),
        auc_macro_ovo       = float('nan'),
        kappa               = _quiet(skm.cohen_kappa_score, y_true, y_pred, labels=labels),
        kappa_quadratic     = _quiet(skm.cohen_kappa_score, y_true, y_pred, labels=labels, weights='quadratic'),
        ece                 = expected_calibration_error(y_true, probs, num_bins),
        nll                 = -np.log(np.maximum(probs[np.arange(len(y_true)), y_true], NLL_FLOOR)).mean(),
    )
    if len(np.unique(y_true)) == num_classes:
        if num_classes == 2:
            out['auc_macro_ovr'] = out['auc_macro_ovo'] = skm.roc_auc_score(y_true, probs[:, 1])
        else:
            p = probs / probs.sum(axis=1, keepdims=True)
            out['auc_macro_ovr'] = skm.roc_auc_score(y_true, p, multi_class='ovr', average='macro', labels=labels)
            out['auc_macro_ovo'] = skm.roc_auc_score(y_true, p, multi_class='ovo', average='macro', labels=labels)
    out = {k: float(v) for k, v in out.items()}
    out['confusion_matrix'] = skm.confusion_matrix(y_true, y_pred, labels=labels).tolist()
    return out

def _quiet(fn, *args, **kwargs) -> float:
    with warnings.catch_warnings(), np.errstate(divide='ignore', invalid='ignore'):
        warnings.simplefilter('ignore')
        return float(fn(*args, **kwargs))

#----------------------------------------------------------------------------
# Paired comparison of two classifiers on the same images.

def paired_accuracy(y_true, pred_a, pred_b) -> dict:
    """Accuracy difference a - b with its standard error (per-image differences), and the discordant counts."""
    y_true = np.asarray(y_true)
    d = (np.asarray(pred_a) == y_true).astype(np.float64) - (np.asarray(pred_b) == y_true).astype(np.float64)
    n = len(d)
    return dict(diff=float(d.mean()), se=float(d.std(ddof=1) / np.sqrt(n)) if n > 1 else float('nan'),
        a_only=int((d > 0).sum()), b_only=int((d < 0).sum()), n=int(n))

def paired_ece(y_true, probs_a, probs_b, num_bins: int = 15, reps: int = 2000, seed: int = 0) -> dict:
    """ECE difference a - b on the same images, with the standard error of a paired bootstrap
    (`reps` resamples of the images, the same resample for both models; numpy seed `seed`)."""
    y_true, probs_a, probs_b = np.asarray(y_true), np.asarray(probs_a, dtype=np.float64), np.asarray(probs_b, dtype=np.float64)
    n = len(y_true)
    diff = expected_calibration_error(y_true, probs_a, num_bins) - expected_calibration_error(y_true, probs_b, num_bins)
    rng = np.random.default_rng(seed)
    boot = np.empty(reps)
    for r in range(reps):
        i = rng.integers(0, n, n)
        boot[r] = expected_calibration_error(y_true[i], probs_a[i], num_bins) - expected_calibration_error(y_true[i], probs_b[i], num_bins)
    return dict(diff=float(diff), se=float(boot.std(ddof=1)) if reps > 1 else float('nan'), reps=int(reps), n=int(n))

#----------------------------------------------------------------------------
