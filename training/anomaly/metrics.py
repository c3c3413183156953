# medEDM: diffusion-model training toolkit for medical imaging.

"""The reference's anomaly-map post-processing and metrics (Behrendt et al.,
utils_eval.py semantics; research notes section 1.4), on (H, W, S) volumes
whose last axis is the axial slice:

    1. residual |x - x_hat| (in [0, 1] intensity units)
    2. times the brain mask eroded per axial slice (2-D cross, H // 25 iterations)
    3. 3-D median filter 5 x 5 x 5
    4. threshold: bisection over [0, max] on the pooled validation voxels, 10 steps, maximising Dice
    5. binarise, 3-D connected components (26-connectivity), components of <= 7 voxels removed
    6. per volume: Dice, AUPRC (average precision) and AUROC over all voxels
       (scikit-learn), averaged over volumes ignoring NaN; per-volume best Dice
       (the bisection on that volume alone: an upper bound)

Conventions of the hand-made cases (tests): Dice of an empty prediction and
an empty lesion mask is NaN (0/0, excluded from the mean as the reference's
nanmean), of an empty prediction with a lesion 0; AUROC and AUPRC of a
volume without lesion voxels are NaN (undefined), never a warning's number."""

import numpy as np
from scipy import ndimage

#----------------------------------------------------------------------------
# Steps 2-3.

def erode_mask(brain: np.ndarray, iterations: int | None = None) -> np.ndarray:
    """Per axial slice (last axis) binary erosion with a 2-D cross; H // 25 iterations (3 at 96 px)."""
    iterations = brain.shape[0] // 25 if iterations is None else iterations
    if iterations < 1: # scipy would erode until nothing changes.
        return brain.astype(bool)
    cross = ndimage.generate_binary_structure(2, 1)
    out = np.zeros(brain.shape, dtype=bool)
    for k in range(brain.shape[2]):
        out[:, :, k] = ndimage.binary_erosion(brain[:, :, k], structure=cross, iterations=iterations)
    return out

def anomaly_map(score: np.ndarray, brain: np.ndarray, median: int = 5) -> np.ndarray:
    """Score (e.g. |x - x_hat|) -> masked by the eroded brain -> 3-D median filter."""
    masked = np.where(erode_mask(brain), score, 0).astype(np.float32)
    return ndimage.median_filter(masked, size=median, mode='reflect') if median > 1 else masked

#----------------------------------------------------------------------------
# Step 4: Dice and the bisection threshold search.

def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    p, g = pred.astype(bool), gt.astype(bool)
    denom = int(p.sum()) + int(g.sum())
    return float('nan') if denom == 0 else 2.0 * int((p & g).sum()) / denom

def find_threshold(score: np.ndarray, gt: np.ndarray, lo: float = 0.0, hi: float | None = None, steps: int = 10) -> tuple[float, float]:
    """Bisection for the Dice-maximising threshold (Zimmerer et al.'s search, as the reference):
    each step compares Dice at the quarter and three-quarter points of the interval and keeps the
    better half (ties: the upper half). Returns (threshold, Dice at it); Dice is NaN-safe (NaN = 0)."""
    score, gt = np.asarray(score).ravel(), np.asarray(gt).ravel().astype(bool)
    hi = float(score.max()) if hi is None else float(hi)
    if hi <= lo:
        hi = lo + 1.0
    best_dice, best_t = 0.0, (lo + hi) / 2
    d = lambda t: np.nan_to_num(dice(score > t, gt), nan=0.0)
    for _ in range(steps):
        q_lo, q_hi = lo + 0.25 * (hi - lo), lo + 0.75 * (hi - lo)
        d_lo, d_hi = d(q_lo), d(q_hi)
        centre = lo + 0.5 * (hi - lo)
        if d_lo > d_hi:
            if d_lo > best_dice:
                best_dice, best_t = d_lo, q_lo
            hi = centre
        else:
            if d_hi > best_dice:
                best_dice, best_t = d_hi, q_hi
            lo = centre
    return float(best_t), float(best_dice)

#----------------------------------------------------------------------------
# Step 5.

def remove_small_components(pred: np.ndarray, max_size: int = 7) -> np.ndarray:
    """Drop 3-D connected components (26-connectivity) of <= max_size voxels."""
    labels, n = ndimage.label(pred.astype(bool), structure=np.ones((3, 3, 3), dtype=bool))
    if n == 0:
        return pred.astype(bool)
    sizes = np.bincount(labels.ravel())
    keep = sizes > max_size
    keep[0] = False
    return keep[labels]

#----------------------------------------------------------------------------
# Step 6: per-volume metrics with scikit-learn.

def auroc_auprc(score: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    from sklearn.metrics import auc, average_precision_score, roc_curve
    y, s = np.asarray(gt).ravel().astype(bool), np.asarray(score, dtype=np.float64).ravel()
    if y.all() or not y.any(): # One class only: undefined.
        return float('nan'), float('nan')
    fpr, tpr, _ = roc_curve(y, s)
    return float(auc(fpr, tpr)), float(average_precision_score(y, s))

def volume_metrics(amap: np.ndarray, gt: np.ndarray, threshold: float, min_component: int = 7) -> dict:
    pred = remove_small_components(amap > threshold, min_component)
    auroc, auprc = auroc_auprc(amap, gt)
    _, best = find_threshold(amap, gt) if gt.any() else (None, float('nan'))
    return dict(dice=dice(pred, gt), auprc=auprc, auroc=auroc, best_dice=best,
        predicted_voxels=int(pred.sum()), lesion_voxels=int(np.asarray(gt).sum()))

def summarize(values) -> dict:
    """mean +- std over volumes (NaN ignored) and the count used."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return dict(mean=float('nan'), std=float('nan'), n=0)
    return dict(mean=float(v.mean()), std=float(v.std()), n=int(len(v)))

def paired(a, b) -> dict:
    """Paired difference a - b over volumes: mean, standard error, n (volumes where both are finite)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    d = a[ok] - b[ok]
    if len(d) == 0:
        return dict(mean=float('nan'), se=float('nan'), n=0)
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float('nan')
    return dict(mean=float(d.mean()), se=se, n=int(len(d)))

#----------------------------------------------------------------------------
