# medEDM: anomaly family: sigma mapping, simplex noise, patched preconditioning,
# batched inference, post-processing and metrics against scikit-learn.

import numpy as np
import pytest
import torch
from sklearn.metrics import auc, average_precision_score, roc_curve

from training import networks
from training.anomaly import inference
from training.anomaly import loss as anomaly_loss
from training.anomaly import metrics as M
from training.anomaly import networks as anomaly_networks
from training.anomaly import simplex

def tiny_unet(res=16):
    torch.manual_seed(0)
    return networks.EDMPrecond(img_resolution=res, img_channels=1, model_type='DhariwalUNet', model_channels=8, channel_mult=[1, 2],
        num_blocks=1, attn_resolutions=[], dropout=0, sigma_data=0.66).eval()

def tiny_cddpm(res=16):
    torch.manual_seed(0)
    return anomaly_networks.EncoderConditionedPrecond(img_resolution=res, img_channels=1, model_channels=8, channel_mult=[1, 2], num_blocks=1,
        attn_resolutions=[], dropout=0, encoder_channels=4, encoder_blocks=[1, 1]).eval()

#----------------------------------------------------------------------------
# sigma_test of the reference's t: sqrt((1 - abar) / abar), cosine schedule, index t - 1.

def test_reference_sigma_from_cosine_schedule():
    s = 0.008
    f = lambda t: np.cos((t / 1000 + s) / (1 + s) * np.pi / 2) ** 2
    abar_500 = f(500) / f(0) # Index 499 = f(500) / f(0) (no beta clipping in the middle).
    assert anomaly_loss.reference_sigma(500) == pytest.approx(np.sqrt((1 - abar_500) / abar_500), rel=1e-9)
    assert anomaly_loss.reference_sigma([250, 500, 750]) == pytest.approx([0.424995, 1.012390, 2.435436], abs=1e-6)
    table = anomaly_loss.sigma_table()
    assert np.all(np.diff(table) > 0) and table[0] < 0.01
    with pytest.raises(ValueError, match='reference time step must be in 1..1000, got 0'):
        anomaly_loss.reference_sigma(0)

def test_cosine_sigma_distribution_draws_table_values():
    loss = anomaly_loss.AnomalyLoss(t_min=10, t_max=20)
    torch.manual_seed(0)
    sigma = loss.sample_sigma([256, 1, 1, 1], torch.device('cpu'))
    table = torch.as_tensor(anomaly_loss.sigma_table(), dtype=torch.float32)
    assert torch.isin(sigma, table[10:21]).all() and len(torch.unique(sigma)) == 11

#----------------------------------------------------------------------------
# Simplex noise: one field shared by the batch, seeded, not unit variance.

def test_simplex_noise_shared_over_batch_and_seeded():
    y = torch.zeros(5, 1, 32, 32)
    torch.manual_seed(3)
    a = loss_noise = anomaly_loss.AnomalyLoss(noise='simplex').sample_noise(y)
    torch.manual_seed(3)
    b = anomaly_loss.AnomalyLoss(noise='simplex').sample_noise(y)
    assert torch.equal(a, b) and a.shape == y.shape
    assert all(torch.equal(a[0], a[i]) for i in range(5)) # One field for the whole batch.
    assert 0.3 < float(a.std()) < 1.2 and float(a[0].std()) > 0
    one = simplex.simplex_2d(torch.rand(5000) * 40, torch.rand(5000) * 40, torch.cat([torch.randperm(256)] * 2))
    assert one.abs().max() <= 1.0

#----------------------------------------------------------------------------
# Patched preconditioning: the output equals the input outside the box, bit for bit.

def test_patched_output_equals_input_outside_box_bit_for_bit():
    net = tiny_unet()
    torch.manual_seed(1)
    x = torch.randn(6, 1, 16, 16)
    corners = torch.tensor([[0, 0], [0, 8], [8, 0], [8, 8], [3, 5], [0, 0]])
    mask = inference.box_masks(corners, 8, 16, 16)
    sigma = 1.0124 * mask
    with torch.no_grad():
        D = net(x + sigma * torch.randn_like(x), sigma)
    outside = mask == 0
    assert torch.equal(D[outside], (x + sigma * 0)[outside]) # Exactly the clean input.
    assert not torch.equal(D[~outside], x[~outside])

def test_patched_loss_is_zero_outside_the_box_and_inside_is_l1():
    net = tiny_unet()
    loss = anomaly_loss.PatchedLoss(patch_size=8, sigma_data=0.66)
    torch.manual_seed(0)
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    out = loss(net, dict(image=x))
    per_sample = (out != 0).reshape(4, -1).sum(1)
    assert torch.all(per_sample <= 64) and torch.all(per_sample > 32) # One 8 x 8 cell per sample.
    assert torch.all(out >= 0)

#----------------------------------------------------------------------------
# Batched grid inference = the reference's one box / one volume at a time.

@pytest.mark.parametrize('kind', ['patched', 'full'])
def test_batched_inference_equals_reference_loop(kind):
    net = tiny_unet() if kind == 'patched' else tiny_cddpm()
    torch.manual_seed(2)
    vols = [torch.rand(s, 1, 16, 16) * 2 - 1 for s in (3, 5)]
    method = dict(kind=kind, sigmas=[1.0124] if kind == 'patched' else [0.425, 1.0124, 2.4354], noise='simplex', patch_size=8, stride=8)
    batched = inference.reconstruct_volumes(net, vols, method, seed=4, batch=7)
    for v, vol in enumerate(vols):
        ref = inference.reconstruct_volume_reference(net, vol, method, seed=4, index=v)
        assert torch.allclose(batched[v], ref, atol=1e-5, rtol=0)

def test_grid_boxes_cover_and_overlap_average():
    assert inference.grid_boxes(96, 96, 48) == [(0, 0, 48, 48), (0, 48, 48, 96), (48, 0, 96, 48), (48, 48, 96, 96)]
    boxes = inference.grid_boxes(16, 16, 8, 4)
    assert len(boxes) == 9
    net = lambda x, sigma: x + 1 # D = x + 1 everywhere: the average of overlapping boxes is x + 1 too.
    x = torch.zeros(2, 1, 16, 16)
    out = inference.reconstruct_patched(net, x, torch.zeros_like(x), 1.0, boxes)
    assert torch.allclose(out, x + 1)

#----------------------------------------------------------------------------
# Post-processing and metrics.

def test_auroc_auprc_match_sklearn_with_ties():
    rng = np.random.default_rng(0)
    gt = rng.random((6, 6, 4)) < 0.2
    score = np.round(rng.random((6, 6, 4)) + gt * 0.3, 1) # Many ties.
    auroc, auprc = M.auroc_auprc(score, gt)
    fpr, tpr, _ = roc_curve(gt.ravel(), score.ravel())
    assert auroc == pytest.approx(auc(fpr, tpr), abs=1e-12)
    assert auprc == pytest.approx(average_precision_score(gt.ravel(), score.ravel()), abs=1e-12)
    # Hand case with a tie: scores (pos 0.9, neg 0.9, pos 0.5, neg 0.1): AUROC over the 4 (pos, neg) pairs = (0.5 + 1 + 0 + 1) / 4,
    # AP = precision 1/2 at recall 1/2 (the tie enters at once), then 2/3 at recall 1: 0.5*0.5 + 0.5*2/3.
    auroc, auprc = M.auroc_auprc(np.array([0.9, 0.9, 0.5, 0.1]), np.array([1, 0, 1, 0]))
    assert auroc == pytest.approx(0.625) and auprc == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)

def test_empty_lesion_and_empty_prediction_cases():
    gt = np.zeros((8, 8, 4), dtype=bool)
    assert np.isnan(M.dice(np.zeros_like(gt), gt))              # 0 / 0: excluded from the mean.
    assert M.dice(np.ones_like(gt), gt) == 0
    assert all(np.isnan(v) for v in M.auroc_auprc(np.random.rand(8, 8, 4), gt))
    gt[2:4, 2:4, 1:3] = True
    out = M.volume_metrics(np.zeros(gt.shape), gt, threshold=0.5) # No predicted voxel.
    assert out['dice'] == 0 and out['predicted_voxels'] == 0 and out['auroc'] == pytest.approx(0.5)
    assert M.summarize([float('nan'), 0.5, 1.0]) == dict(mean=0.75, std=0.25, n=2)
    assert M.paired([1, 2, float('nan')], [0, 0, 1]) == dict(mean=1.5, se=pytest.approx(0.5), n=2)

def test_threshold_search_finds_known_optimum():
    # Lesion scores 0.6, healthy 0.2: any threshold in [0.2, 0.6) gives Dice 1.
    score = np.full((10, 10, 10), 0.2)
    gt = np.zeros(score.shape, dtype=bool)
    gt[:3] = True
    score[gt] = 0.6
    t, d = M.find_threshold(score, gt)
    assert d == 1.0 and 0.2 <= t < 0.6
    # Graded case: lesion scores uniform in (0.5, 1], healthy uniform in [0, 0.7): the best threshold
    # analytically: Dice(t) = 0.4 (1 - t) / (0.2 (1 - t) + 0.1) for t >= 0.7 (no false positives) rises as t falls, and drops
    # below 0.7 where false positives enter: t* = 0.7, Dice* = 0.75. The reference's bisection (10 steps) lands next to it.
    rng = np.random.default_rng(1)
    gt = rng.random(20000) < 0.1
    score = np.where(gt, rng.uniform(0.5, 1.0, gt.shape), rng.uniform(0, 0.7, gt.shape))
    t, d = M.find_threshold(score, gt)
    grid = np.linspace(0, 1, 2001)
    best = max(M.dice(score > g, gt) for g in grid)
    assert d == pytest.approx(M.dice(score > t, gt)) and d >= best - 5e-3 and 0.69 < t < 0.72 and d == pytest.approx(0.75, abs=0.03)

def test_connected_components_and_erosion():
    pred = np.zeros((12, 12, 12), dtype=bool)
    pred[0:2, 0:2, 0:2] = True      # 8 voxels: kept.
    pred[6, 6, 6:13] = True         # 6 voxels: removed.
    pred[10, 10, 10] = pred[11, 11, 11] = True # Diagonal neighbours (26-connectivity): 2 voxels, removed.
    out = M.remove_small_components(pred)
    assert out.sum() == 8 and out[0:2, 0:2, 0:2].all()
    brain = np.zeros((50, 50, 2), dtype=bool)
    brain[10:40, 10:40] = True
    er = M.erode_mask(brain) # 50 // 25 = 2 iterations of a cross, per slice.
    assert er[12:38, 12:38].all() and er.sum() == 2 * (26 * 26)
    assert M.erode_mask(brain[:24]).sum() == brain[:24].sum() # 24 // 25 = 0: no erosion (scipy would erode to nothing).

#----------------------------------------------------------------------------
# cDDPM: embedding concatenated after its own MLP; encoder pretraining -> init_from.

def test_cddpm_embedding_path_and_encoder_gradients():
    net = tiny_cddpm().train()
    unet = net.precond.model
    assert unet.embedding_mlp and unet.map_layer0.in_features == 8 and unet.map_embedding0.in_features == net.embedding_dim == 32
    with torch.no_grad(): # ADM's zero-initialised layers (output, residual branches) pass no gradient at step 0: as after a few steps.
        for p in unet.parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(0, 0.1)
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    loss = anomaly_loss.CondLoss(sigma_data=0.66)(net, dict(image=x))
    loss.sum().backward()
    assert net.encoder.stem.weight.grad is not None and net.encoder.stem.weight.grad.abs().sum() > 0 # Trained jointly.
    with torch.no_grad(): # The embedding of another slice changes the output: the condition is used.
        a = net(x, torch.ones(3), cond=x)
        b = net(x, torch.ones(3), cond=x.flip(-1))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match='needs the clean input slice as cond'):
        net(x, torch.ones(3))

def test_masked_pretraining_loss_and_init_from(tmp_path):
    from torch_utils import persistence
    from training import stages
    torch.manual_seed(0)
    pre = anomaly_networks.MaskedPretrainNet(img_resolution=16, img_channels=1, encoder_channels=4, encoder_blocks=[1, 1])
    loss_fn = anomaly_loss.MaskedPretrainLoss(patch_size=4)
    x = torch.rand(2, 1, 16, 16)
    torch.manual_seed(1)
    out = loss_fn(pre, dict(image=x))
    torch.manual_seed(1)
    m = loss_fn.patch_mask(x)
    assert torch.all(out[m == 0] == 0) and m[0].sum() == 16 * 10 # round(16 patches x 0.35) = 6 kept, 10 masked.
    persistence.save_snapshot(dict(ema=pre, loss_fn=loss_fn, augment_pipe=None, dataset_kwargs={}), tmp_path / 'pre.pkl')
    net = tiny_cddpm()
    copied = stages.init_from(net, dict(path=str(tmp_path / 'pre.pkl'), module='encoder', source='encoder'))
    assert copied and all(torch.equal(net.encoder.state_dict()[k], pre.encoder.state_dict()[k]) for k in copied)

#----------------------------------------------------------------------------
# Simplex frequency convention (AnoDDPM's rand_2d_octaves: noise(x / frequency),
# frequency halved and amplitude times persistence per octave): `frequency` is
# a length in pixels, so the field of frequency 2f sampled every second pixel
# is the field of frequency f (to float rounding).

def test_simplex_frequency_is_a_length_in_pixels():
    a = simplex.simplex_field(12, 12, frequency=8, generator=torch.Generator().manual_seed(5))
    b = simplex.simplex_field(24, 24, frequency=16, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(a, b[::2, ::2], atol=1e-5, rtol=0)
    c = simplex.simplex_field(12, 12, frequency=16, generator=torch.Generator().manual_seed(5))
    assert not torch.allclose(a, c)

def test_loss_simplex_frequency_reaches_training_and_test_noise():
    y = torch.zeros(2, 1, 16, 16)
    loss = anomaly_loss.PatchedLoss(patch_size=8, simplex_frequency=5.0)
    torch.manual_seed(3)
    got = loss.sample_noise(y)
    torch.manual_seed(3)
    assert torch.equal(got[0, 0], simplex.simplex_field(16, 16, frequency=5.0))
    method = inference.method_of(loss)
    assert method['frequency'] == 5.0
    assert torch.equal(inference.noise_fields(1, 16, 16, 'simplex', 'cpu', seed=2, frequency=5.0)[0, 0],
        simplex.simplex_field(16, 16, frequency=5.0, generator=torch.Generator().manual_seed(2)))
    with pytest.raises(ValueError, match='training.loss.simplex_frequency must be a positive number, got 0'):
        anomaly_loss.AnomalyLoss(simplex_frequency=0)

#----------------------------------------------------------------------------
# Skipping jobs outside the eroded brain keeps the anomaly maps.

class CountingNet(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.samples = net, 0
        self.encode = getattr(net, 'encode', None)
        if self.encode is None:
            del self.encode
    def forward(self, x, sigma, **kwargs):
        self.samples += len(x)
        return self.net(x, sigma, **kwargs)

@pytest.mark.parametrize('kind', ['patched', 'full'])
def test_skipping_slices_and_boxes_outside_the_brain_keeps_the_maps(kind):
    net = CountingNet(tiny_unet() if kind == 'patched' else tiny_cddpm())
    torch.manual_seed(2)
    brain = np.zeros((16, 16, 6), dtype=bool)
    brain[2:8, 3:13, 1:5] = True # Slices 0 and 5 empty, the lower boxes (rows 8..15) too (no erosion below 25 px, as the map).
    image = np.where(brain, np.random.default_rng(0).uniform(size=brain.shape), 0).astype(np.float32)
    vol = torch.from_numpy(np.transpose(image, (2, 0, 1)))[:, None] * 2 - 1
    active = torch.from_numpy(np.transpose(M.erode_mask(brain), (2, 0, 1)))[:, None]
    method = dict(kind=kind, sigmas=[1.0124] if kind == 'patched' else [0.425, 1.0124], noise='simplex', patch_size=8, stride=8)
    full = inference.reconstruct_volumes(net, [vol], method, seed=1, batch=5)[0]
    calls_full, net.samples = net.samples, 0
    skip = inference.reconstruct_volumes(net, [vol], method, seed=1, batch=5, active=[active])[0]
    assert net.samples == 4 * 2 and calls_full == (4 * 6 if kind == 'patched' else 2 * 6) # (boxes or sigmas) x slices.
    to_map = lambda r: M.anomaly_map(np.abs(image - np.transpose(((r[:, 0].numpy() + 1) / 2), (1, 2, 0))), brain)
    assert np.abs(to_map(skip) - to_map(full)).max() <= 1e-6
    assert torch.equal(skip[0], vol[0]) # Skipped: the input itself.

#----------------------------------------------------------------------------
# Few solver steps from sigma_test (training/sampling.py): one step is the one-call x0 prediction.

def test_solver_reconstruction_one_step_is_the_x0_call():
    net = tiny_cddpm()
    torch.manual_seed(4)
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    noise = inference.noise_fields(1, 16, 16, 'simplex', 'cpu', seed=0)
    one = inference.reconstruct_full(net, x, noise, [0.425, 1.0124])
    assert torch.allclose(inference.reconstruct_solver(net, x, noise, [0.425, 1.0124], steps=1), one, atol=1e-5)
    three = inference.reconstruct_solver(net, x, noise, [0.425, 1.0124], steps=3)
    assert torch.isfinite(three).all() and not torch.allclose(three, one, atol=1e-3)
    method = dict(kind='full', sigmas=[1.0124], noise='simplex', steps=3)
    assert torch.allclose(inference.reconstruct_volumes(net, [x], method, seed=0)[0], inference.reconstruct_solver(net, x, noise, [1.0124], 3), atol=1e-6)

#----------------------------------------------------------------------------
# Healthy inter-subject variation of the data builder.

def test_varied_subject_extends_random_subject():
    from training import mri_phantoms
    from training.anomaly import data as anomaly_data
    shape, centre = (20, 24, 20), np.array([10.0, 12.0, 10.0])
    base = mri_phantoms.RandomSubject(np.random.default_rng(7), shape)
    plain = anomaly_data.VariedSubject(np.random.default_rng(7), shape, centre, warp_mm=2.5, warp_smooth_mm=16.0, fine_warp_mm=0.0,
        ventricle_max=0.0, gamma_std=0.12, bias_std=0.12)
    pts = np.random.default_rng(0).uniform(0, 19, size=(3, 50))
    assert np.allclose(plain.template_coords(pts), base.template_coords(pts), atol=1e-9) # The base class draws first.
    assert plain.gamma == base.gamma and plain.noise_std == base.noise_std
    big = anomaly_data.VariedSubject(np.random.default_rng(7), shape, centre, warp_mm=2.5, warp_smooth_mm=16.0, fine_warp_mm=0.0,
        ventricle_max=0.0, gamma_std=0.12, bias_std=0.12)
    big.ventricle_k = 0.3 # Ventricles enlarged: subject points near the centre sample the template closer to it.
    near = base.template_coords(centre[:, None] + 2.0)
    assert np.linalg.norm(big.template_coords(centre[:, None] + 2.0) - centre[:, None]) < np.linalg.norm(near - centre[:, None])
    with pytest.raises(ValueError, match="variation must be one of realistic, small, got 'x'"):
        anomaly_data.Geometry.subject(None, np.random.default_rng(0), variation='x')
