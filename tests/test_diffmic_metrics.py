# medEDM: DiffMIC metrics against scikit-learn and hand-computed cases; ECE on known answers.

import numpy as np
import pytest
from sklearn import metrics as skm

from training.diffmic import metrics
from training.diffmic.inference import to_probabilities

#----------------------------------------------------------------------------

def test_metrics_match_sklearn_on_random_case():
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.ones(5), size=200)
    y = rng.integers(0, 5, 200)
    pred = probs.argmax(1)
    m = metrics.classification_metrics(y, probs, 5)
    assert m['accuracy'] == pytest.approx(skm.accuracy_score(y, pred))
    assert m['balanced_accuracy'] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m['f1_macro'] == pytest.approx(skm.f1_score(y, pred, average='macro'))
    assert m['precision_macro'] == pytest.approx(skm.precision_score(y, pred, average='macro'))
    assert m['recall_macro'] == pytest.approx(skm.recall_score(y, pred, average='macro'))
    assert m['auc_macro_ovr'] == pytest.approx(skm.roc_auc_score(y, probs, multi_class='ovr'))
    assert m['auc_macro_ovo'] == pytest.approx(skm.roc_auc_score(y, probs, multi_class='ovo'))
    assert m['auc_macro_ovr'] != m['auc_macro_ovo'] # Two different numbers, reported under their own names.
    assert m['kappa_quadratic'] == pytest.approx(skm.cohen_kappa_score(y, pred, weights='quadratic'))
    assert m['kappa'] == pytest.approx(skm.cohen_kappa_score(y, pred))
    assert m['confusion_matrix'] == skm.confusion_matrix(y, pred).tolist()

def test_hand_case_ties_and_a_class_absent_from_the_predictions():
    # 3 classes; the tie [0.5, 0.5, 0] goes to class 0 (first maximum); class 2 is never predicted.
    y = np.array([0, 1, 1, 2])
    probs = np.array([[0.5, 0.5, 0], [0.2, 0.8, 0], [0.6, 0.4, 0], [0.1, 0.9, 0]])
    m = metrics.classification_metrics(y, probs, 3)
    # pred = [0, 1, 0, 1]: correct 2 of 4.
    assert m['accuracy'] == 0.5
    assert m['confusion_matrix'] == [[1, 0, 0], [1, 1, 0], [0, 1, 0]]
    # Precision: class 0 1/2, class 1 1/2, class 2 never predicted -> 0; macro = 1/3.
    assert m['precision_macro'] == pytest.approx(1 / 3)
    # Recall: 1, 1/2, 0 -> 1/2; F1: 2/3, 1/2, 0 -> 7/18.
    assert m['recall_macro'] == pytest.approx(0.5)
    assert m['f1_macro'] == pytest.approx(7 / 18)
    assert m['balanced_accuracy'] == pytest.approx(0.5)
    # kappa: p_o = 1/2, p_e = (1*2 + 2*2 + 1*0) / 16 = 3/8 -> (1/2 - 3/8) / (5/8) = 1/5.
    assert m['kappa'] == pytest.approx(0.2)

def test_single_class_batch():
    y = np.zeros(4, dtype=np.int64)
    probs = np.array([[0.9, 0.1], [0.7, 0.3], [0.4, 0.6], [0.8, 0.2]])
    m = metrics.classification_metrics(y, probs, 2)
    assert m['accuracy'] == 0.75
    assert np.isnan(m['auc_macro_ovr']) and np.isnan(m['auc_macro_ovo']) # Undefined with one class in y_true.
    assert m['recall_macro'] == pytest.approx((0.75 + 0) / 2) # Class 1 absent: recall 0 over both classes.
    assert m['confusion_matrix'] == [[3, 1], [0, 0]]
    assert m['kappa'] == pytest.approx(0.0) # p_e = p_o * 1 -> kappa 0 (sklearn).

def test_ece_known_answers():
    # Every confidence 0.8, 6 of 10 correct: ECE = |0.6 - 0.8| = 0.2.
    y = np.array([0] * 6 + [1] * 4)
    probs = np.tile([0.8, 0.2], (10, 1))
    assert metrics.expected_calibration_error(y, probs, num_bins=10) == pytest.approx(0.2)
    # Two bins of 5: confidences 0.55 (3/5 right) and 0.95 (5/5 right): (5 |0.6-0.55| + 5 |1-0.95|) / 10 = 0.05.
    y = np.zeros(10, dtype=np.int64)
    y[3:5] = 1
    probs = np.array([[0.55, 0.45]] * 5 + [[0.95, 0.05]] * 5)
    assert metrics.expected_calibration_error(y, probs, num_bins=10) == pytest.approx(0.05)
    # Perfectly calibrated: confidence 1 and always right.
    assert metrics.expected_calibration_error(np.arange(3), np.eye(3)) == 0.0
    # A confidence exactly on a bin edge (0.8 with 10 bins) falls in the bin (0.7, 0.8].
    b = metrics.calibration_bins(np.zeros(1, dtype=np.int64), np.array([[0.8, 0.2]]), 10)
    assert b['count'][7] == 1 and b['count'].sum() == 1

def test_paired_accuracy_and_probabilities():
    y = np.array([0, 1, 2, 0])
    p = metrics.paired_accuracy(y, np.array([0, 1, 2, 1]), np.array([0, 0, 2, 0]))
    assert p['diff'] == 0 and p['a_only'] == 1 and p['b_only'] == 1
    assert p['se'] == pytest.approx(np.std([0, 1, 0, -1], ddof=1) / 2)
    import torch
    q = to_probabilities(torch.tensor([[0.7, 0.5, -0.2], [-1.0, -0.1, -0.3]]))
    assert torch.allclose(q, torch.tensor([[0.7 / 1.2, 0.5 / 1.2, 0], [1 / 3, 1 / 3, 1 / 3]]))

#----------------------------------------------------------------------------
#----------------------------------------------------------------------------
# Calibration: vote shares, temperature scaling fitted on another split, the paired ECE difference, the NLL.

def test_vote_shares_and_estimators():
    import torch
    from training.diffmic import inference
    y0 = torch.tensor([[[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.5, 0.6, -0.1]]]) # 1 image, S = 4: argmax 0, 1, 0, 1.
    assert torch.equal(inference.class_probabilities(y0, 'votes'), torch.tensor([[0.5, 0.5, 0.0]]))
    assert torch.allclose(inference.class_probabilities(y0, 'mean'), to_probabilities(y0.mean(dim=1)))
    with pytest.raises(ValueError, match="--estimator: expected one of votes, mean, got 'median'"):
        inference.class_probabilities(y0, 'median')

def test_temperature_scaling_recovers_a_known_temperature():
    from training.diffmic import calibration
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, size=(20000, 4))
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    # Labels drawn from softmax(z / 2): the model is overconfident by a temperature of 2.
    q = np.exp(z / 2) / np.exp(z / 2).sum(1, keepdims=True)
    y = (q.cumsum(1) > rng.random((20000, 1))).argmax(1)
    t = calibration.fit_temperature(y, p)
    assert t == pytest.approx(2.0, abs=0.08)
    pt = calibration.apply_temperature(p, t)
    assert np.allclose(pt.sum(1), 1) and np.array_equal(pt.argmax(1), p.argmax(1)) # The argmax (accuracy) is unchanged.
    assert np.allclose(calibration.apply_temperature(p, 1.0), p)
    assert calibration.nll(y, pt) < calibration.nll(y, p)
    assert metrics.expected_calibration_error(y, pt) < 0.02 < metrics.expected_calibration_error(y, p)

def test_paired_ece_and_nll():
    y = np.array([0] * 6 + [1] * 4)
    a, b = np.tile([0.8, 0.2], (10, 1)), np.tile([0.6, 0.4], (10, 1)) # ECE 0.2 and 0.0.
    d = metrics.paired_ece(y, a, b, num_bins=10, reps=200)
    assert d['diff'] == pytest.approx(0.2) and d['se'] > 0 and d['n'] == 10
    same = metrics.paired_ece(y, a, a, num_bins=10, reps=50)
    assert same['diff'] == 0 and same['se'] == 0
    m = metrics.classification_metrics(np.array([0, 1]), np.array([[0.5, 0.5], [1.0, 0.0]]), 2)
    assert m['nll'] == pytest.approx((np.log(2) - np.log(metrics.NLL_FLOOR)) / 2) # A zero probability of the true class counts as the floor.
