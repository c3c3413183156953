# medEDM: diffusion-model training toolkit for medical imaging.

"""Post-hoc calibration of class probabilities: temperature scaling (Guo et
al. 2017) fitted on the validation split and applied unchanged to the test
split, the same way for the DCG prior and for DiffMIC (the fair comparison).

Temperature scaling acts on log-probabilities, p_T = softmax(log p / T): for
the DCG's softmax outputs that is exactly scaling its logits (log p = logits
minus a per-image constant), and DiffMIC's probabilities have no logits of
their own. Probabilities are floored at `eps` before the log (DiffMIC's can
be exactly 0). T is the minimiser of the mean negative log-likelihood on the
fitting split (a bounded scalar search over ln T); it never changes the
argmax, so accuracy, F1 and kappa are those of the uncalibrated model."""

import numpy as np
import scipy.optimize

#----------------------------------------------------------------------------

def apply_temperature(probs: np.ndarray, temperature: float, eps: float = 1e-6) -> np.ndarray:
    """(N, K) probabilities -> softmax(log(max(p, eps)) / T), rows summing to 1."""
    z = np.log(np.maximum(np.asarray(probs, dtype=np.float64), eps)) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)

def nll(y_true: np.ndarray, probs: np.ndarray, eps: float = 1e-6) -> float:
    """Mean negative log-likelihood of the true classes (probabilities floored at eps)."""
    p = np.asarray(probs, dtype=np.float64)[np.arange(len(y_true)), np.asarray(y_true)]
    return float(-np.log(np.maximum(p, eps)).mean())

def fit_temperature(y_true: np.ndarray, probs: np.ndarray, bounds: tuple = (0.05, 20.0), eps: float = 1e-6) -> float:
    """The temperature T in `bounds` minimising the NLL of apply_temperature(probs, T) on (y_true, probs)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    assert len(y_true) > 0 and probs.shape[0] == len(y_true)
    f = lambda log_t: nll(y_true, apply_temperature(probs, float(np.exp(log_t)), eps), eps)
    res = scipy.optimize.minimize_scalar(f, bounds=(np.log(bounds[0]), np.log(bounds[1])), method='bounded', options=dict(xatol=1e-5))
    return float(np.exp(res.x))

#----------------------------------------------------------------------------
