# medEDM: DiffMIC end to end, tiny: dataset_tool diffmic-data -> DCG stage and
# label-diffusion stage with torchrun (2 gloo processes) -> evaluate.py diffmic
# (validation-split selection, test metrics, plots); and its bad-input exits.

import csv
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import launch
from training import stages
from training.diffmic import calibration

#----------------------------------------------------------------------------

def _train(config: str, args, cwd, outdir=None) -> str:
    outdir = outdir or os.path.join(cwd, 'runs')
    cmd = launch.torchrun_cmd('train.py', 2) + ['-cd', os.path.join(launch.ROOT, 'configs'), '-cn', config, 'resume=none',
        f'training.outdir={outdir}', 'training.batch_size=8', 'training.total_kimg=0.048', 'training.kimg_per_tick=0.016',
        'training.snapshot_ticks=1', 'training.state_dump_ticks=null', 'training.dataset.resolution=16', 'training.print_summary=false',
        *(['training.network.model_channels=16', 'training.network.encoder_channels=8'] if config == 'diffmic_edm' else ['training.network.channels=8']), *args]
    launch.check(subprocess.run(cmd, cwd=cwd, env=launch.env(), capture_output=True, text=True, timeout=240))
    runs = sorted(glob.glob(os.path.join(outdir, f'*-{config.replace("_", "-")}')))
    return runs[-1]

def _evaluate(args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(launch.ROOT, 'evaluate.py'), 'diffmic', *args], cwd=cwd, env=launch.env(),
        capture_output=True, text=True, timeout=240)

@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    cwd = tmp_path_factory.mktemp('diffmic')
    data = str(cwd / 'data')
    launch.check(subprocess.run([sys.executable, os.path.join(launch.ROOT, 'dataset_tool.py'), 'diffmic-data', '--dest', data,
        '--resolution', '16', '--train-per-class', '15', '--test-per-class', '3'], cwd=cwd, env=launch.env(), capture_output=True, text=True, timeout=120))
    dcg_run = _train('diffmic_dcg', [f'training.dataset.path={data}'], cwd)
    dcg_pkl = sorted(glob.glob(os.path.join(dcg_run, 'network-snapshot-*.pkl')))[-1]
    edm_run = _train('diffmic_edm', [f'training.dataset.path={data}', f'training.frozen.dcg={dcg_pkl}'], cwd)
    return dict(cwd=cwd, data=data, dcg_run=dcg_run, dcg_pkl=dcg_pkl, edm_run=edm_run)

def test_two_stages_and_evaluation(demo):
    cwd = demo['cwd']
    assert os.path.isfile(os.path.join(demo['data'], 'split-seed0-val0.2.json')) # Written by the first stage (whole subjects), read by the second.
    out = cwd / 'eval'
    proc = launch.check(_evaluate(['--network', demo['edm_run'], '--outdir', str(out), '--samples', '3', '--steps', '3'], cwd))
    assert 'paired accuracy difference DiffMIC - DCG' in proc.stdout
    summary = json.loads((out / 'metrics.json').read_text())
    assert summary['split'] == 'test' and summary['images'] == 12 and summary['classes'] == ['healthy', 'hyper', 'hypo', 'mass']
    for model in ('dcg', 'diffmic'):
        for key in ('accuracy', 'balanced_accuracy', 'f1_macro', 'auc_macro_ovr', 'auc_macro_ovo', 'kappa', 'kappa_quadratic', 'ece'):
            assert key in summary[model]
        assert sum(map(sum, summary[model]['confusion_matrix'])) == 12
    # Temperature scaling fitted on the validation split, for both models; the argmax is unchanged.
    assert summary['calibration']['fitted_on'] == 'val' and summary['calibration']['images'] == 16 and summary['estimator'] == 'votes'
    assert summary['guided_map'] == 0
    for model in ('dcg', 'diffmic'):
        assert summary['calibration'][f'temperature_{model}'] > 0 and summary[f'{model}_ts']['accuracy'] == summary[model]['accuracy']
    assert set(summary['paired_ece_diffmic_minus_dcg']) == {'diff', 'se', 'reps', 'n'}
    selection = json.loads((out / 'selection.json').read_text())
    assert selection['on'] == 'val' and selection['selected'] == summary['network'] and len(selection['scores']) >= 1
    for name in ('metrics.csv', 'confusion-dcg.csv', 'confusion-diffmic.png', 'reliability.png', 'panel.png'):
        assert (out / name).is_file()
    # Seeds per image: a second run gives the same numbers.
    again = cwd / 'eval2'
    launch.check(_evaluate(['--network', summary['network'], '--outdir', str(again), '--samples', '3', '--steps', '3'], cwd))
    assert json.loads((again / 'metrics.json').read_text())['diffmic'] == summary['diffmic']
    # Nothing is fitted on the split that is reported.
    val = cwd / 'eval-val'
    launch.check(_evaluate(['--network', summary['network'], '--outdir', str(val), '--samples', '3', '--steps', '3', '--split', 'val'], cwd))
    assert 'calibration' not in json.loads((val / 'metrics.json').read_text())
    # The training part (no augmentation), e.g. to see whether the prior fits its training images better than validation.
    train = cwd / 'eval-train'
    launch.check(_evaluate(['--network', demo['dcg_pkl'], '--outdir', str(train), '--split', 'train'], cwd))
    summary = json.loads((train / 'metrics.json').read_text())
    assert summary['split'] == 'train' and summary['images'] == 44 and 'calibration' not in summary

def test_guided_map_stage(demo, tmp_path):
    # DiffMIC-v2's guided map: set on the loss, stored in the snapshot, used by the evaluation.
    run = _train('diffmic_edm', [f'training.dataset.path={demo["data"]}', f'training.frozen.dcg={demo["dcg_pkl"]}', 'training.loss.guided_map=3'],
        demo['cwd'], outdir=str(tmp_path / 'runs'))
    pkl = sorted(glob.glob(os.path.join(run, 'network-snapshot-*.pkl')))[-1]
    out = tmp_path / 'eval'
    launch.check(_evaluate(['--network', pkl, '--outdir', str(out), '--samples', '9', '--steps', '3', '--no-calibrate'], demo['cwd']))
    summary = json.loads((out / 'metrics.json').read_text())
    assert summary['guided_map'] == 3 and summary['images'] == 12 and 0 <= summary['diffmic']['accuracy'] <= 1
    assert stages.load_snapshot(pkl, torch.device('cpu'))['loss_fn'].guided_map == 3
    proc = _evaluate(['--network', pkl, '--outdir', str(tmp_path / 'uneven'), '--samples', '8', '--no-calibrate'], demo['cwd'])
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr and not (tmp_path / 'uneven').exists()
    assert "--samples 8: the snapshot's guided map (training.loss.guided_map=3) has 9 positions" in proc.stderr

def test_deep_ensemble_baseline(demo, tmp_path):
    cwd = demo['cwd']
    # A second DCG of another training seed: --ensemble averages its y_fusion with the prior's.
    other_run = _train('diffmic_dcg', [f'training.dataset.path={demo["data"]}', 'training.seed=1'], cwd, outdir=str(tmp_path / 'runs'))
    other_pkl = sorted(glob.glob(os.path.join(other_run, 'network-snapshot-*.pkl')))[-1]
    edm_pkl = sorted(glob.glob(os.path.join(demo['edm_run'], 'network-snapshot-*.pkl')))[-1]
    out, alone = tmp_path / 'ens', tmp_path / 'other'
    proc = launch.check(_evaluate(['--network', edm_pkl, '--ensemble', other_pkl, '--outdir', str(out), '--samples', '3', '--steps', '3'], cwd))
    assert 'paired accuracy difference ensemble - DCG' in proc.stdout and 'paired accuracy difference DiffMIC - ensemble' in proc.stdout
    launch.check(_evaluate(['--network', other_pkl, '--outdir', str(alone)], cwd))
    summary = json.loads((out / 'metrics.json').read_text())
    assert summary['ensemble_members'] == [edm_pkl, other_pkl]
    for key in ('paired_accuracy_ensemble_minus_dcg', 'paired_ece_ensemble_minus_dcg', 'paired_accuracy_diffmic_minus_ensemble', 'paired_ece_diffmic_minus_ensemble'):
        assert summary[key]['n'] == 12
    # The ensemble's temperature is fitted on the same two members' outputs on the validation split.
    launch.check(_evaluate(['--network', edm_pkl, '--ensemble', other_pkl, '--outdir', str(tmp_path / 'ens-val'), '--split', 'val', '--samples', '3', '--steps', '3'], cwd))
    val_rows = list(csv.DictReader(open(tmp_path / 'ens-val' / 'metrics.csv')))
    val_y = np.array([summary['classes'].index(r['true']) for r in val_rows])
    val_p = np.array([[float(r[f'p_ensemble_{c}']) for c in summary['classes']] for r in val_rows])
    assert summary['calibration']['temperature_ensemble'] == pytest.approx(calibration.fit_temperature(val_y, val_p), rel=1e-4)
    assert (out / 'confusion-ensemble.csv').is_file()
    # Per image: the ensemble's probabilities are the mean of the two DCGs' own (each evaluated alone).
    rows = list(csv.DictReader(open(out / 'metrics.csv')))
    other = {r['file']: r for r in csv.DictReader(open(alone / 'metrics.csv'))}
    classes = summary['classes']
    for r in rows:
        want = [(float(r[f'p_dcg_{c}']) + float(other[r['file']][f'p_dcg_{c}'])) / 2 for c in classes]
        assert np.allclose([float(r[f'p_ensemble_{c}']) for c in classes], want, atol=1e-6)
        assert r['pred_ensemble'] == classes[int(np.argmax(want))]
    # The prior's own DCG is no second member.
    proc = _evaluate(['--network', edm_pkl, '--ensemble', demo['dcg_pkl'], '--outdir', str(tmp_path / 'same')], cwd)
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr and not (tmp_path / 'same').exists()
    assert f'--ensemble {demo["dcg_pkl"]}: its DCG has the same weights as the prior; an ensemble needs separately trained DCGs' in proc.stderr
    # A missing member is named before anything runs; a member of another split is refused.
    proc = _evaluate(['--network', demo['edm_run'], '--ensemble', 'nowhere.pkl', '--outdir', str(tmp_path / 'gone')], cwd)
    assert proc.returncode == 1 and '--ensemble: snapshot not found: nowhere.pkl' in proc.stderr
    seed1 = _train('diffmic_dcg', [f'training.dataset.path={demo["data"]}', 'training.dataset.split_seed=1'], cwd, outdir=str(tmp_path / 'runs1'))
    seed1_pkl = sorted(glob.glob(os.path.join(seed1, 'network-snapshot-*.pkl')))[-1]
    proc = _evaluate(['--network', edm_pkl, '--ensemble', seed1_pkl, '--outdir', str(tmp_path / 'split')], cwd)
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr
    assert f'--ensemble {seed1_pkl}: trained with training.dataset.split_seed=1, the evaluated snapshot with 0; the members must share the train/validation split' in proc.stderr

def test_bad_inputs_exit_with_one_line(demo, tmp_path):
    cwd = demo['cwd']
    # A test class unknown at training time.
    os.makedirs(os.path.join(demo['data'], 'test', 'zebra'))
    os.link(sorted(glob.glob(os.path.join(demo['data'], 'test', 'mass', '*.png')))[0], os.path.join(demo['data'], 'test', 'zebra', 'z.png'))
    try:
        proc = _evaluate(['--network', demo['dcg_pkl'], '--outdir', str(tmp_path / 'e')], cwd)
    finally:
        os.remove(os.path.join(demo['data'], 'test', 'zebra', 'z.png'))
        os.rmdir(os.path.join(demo['data'], 'test', 'zebra'))
    assert proc.returncode == 1 and "test class 'zebra'" in proc.stderr and 'Traceback' not in proc.stderr
    assert not (tmp_path / 'e').exists()
    # A DCG snapshot with another number of classes: the diffusion stage refuses it by name.
    other = tmp_path / 'three'
    for c in ('a', 'b', 'c'):
        os.makedirs(other / 'train' / c)
        for f in sorted(glob.glob(os.path.join(demo['data'], 'train', 'hyper', '*.png')))[:5]:
            os.link(f, other / 'train' / c / os.path.basename(f))
    cmd = launch.torchrun_cmd('train.py', 0) + ['-cd', os.path.join(launch.ROOT, 'configs'), '-cn', 'diffmic_edm', 'resume=none',
        f'training.outdir={tmp_path}/runs', f'training.dataset.path={other}', 'training.dataset.resolution=16', f'training.frozen.dcg={demo["dcg_pkl"]}']
    proc = subprocess.run(cmd, cwd=cwd, env=launch.env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and 'training.frozen.dcg: the DCG snapshot classifies 4 classes, but the data have 3' in proc.stderr
    assert 'Traceback' not in proc.stderr

#----------------------------------------------------------------------------
