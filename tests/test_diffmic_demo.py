# medEDM: DiffMIC at demo size (slow: about 5 minutes on 2 cores): the
# commands of `make demo-diffmic`, checked against the numbers in the README.

import json
import os
import subprocess
import sys

import pytest

import launch

@pytest.mark.slow
def test_demo_diffmic(tmp_path):
    py, env = sys.executable, launch.env()
    run = lambda cmd: launch.check(subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800))
    configs = ['-cd', os.path.join(launch.ROOT, 'configs')]
    data = str(tmp_path / 'data')
    run([py, os.path.join(launch.ROOT, 'dataset_tool.py'), 'diffmic-data', '--dest', data, '--test-per-class', '200'])
    common = ['resume=none', f'training.outdir={tmp_path}/runs', f'training.dataset.path={data}']
    run(launch.torchrun_cmd('train.py', 2) + configs + ['-cn', 'diffmic_dcg'] + common)
    run([py, os.path.join(launch.ROOT, 'evaluate.py'), 'diffmic', '--network', str(tmp_path / 'runs' / '00000-diffmic-dcg'), '--split', 'val',
        '--outdir', str(tmp_path / 'dcg-val')])
    dcg = json.loads((tmp_path / 'dcg-val' / 'selection.json').read_text())['selected']
    run(launch.torchrun_cmd('train.py', 2) + configs + ['-cn', 'diffmic_edm'] + common + [f'training.frozen.dcg={dcg}'])
    run([py, os.path.join(launch.ROOT, 'evaluate.py'), 'diffmic', '--network', str(tmp_path / 'runs' / '00001-diffmic-edm'),
        '--outdir', str(tmp_path / 'eval'), '--samples', '256', '--steps', '6'])
    summary = json.loads((tmp_path / 'eval' / 'metrics.json').read_text())
    # The README's table (same seeds; gloo on CPU): classes separable, not trivially; DiffMIC gains about
    # 2 points of accuracy (+2.1 +- 1.0 paired) and ties on calibration (ECE 0.069 vs 0.068).
    assert 0.6 < summary['dcg']['accuracy'] < 0.9
    assert summary['paired_accuracy_diffmic_minus_dcg']['diff'] > 0.015
    assert abs(summary['diffmic']['ece'] - summary['dcg']['ece']) < 0.01
    assert summary['diffmic']['accuracy_certain_half'] > summary['diffmic']['accuracy_uncertain_half'] + 0.1
