# medEDM: training_stats with EDM semantics, single process and 2 gloo ranks.

import json
import math

import launch
import torch

from torch_utils import training_stats

def test_single_process_mean_std():
    training_stats.report('T/a', torch.tensor([1.0, 2.0, 3.0, 4.0]))
    training_stats.report('T/a', 5.0)
    c = training_stats.Collector(regex='T/.*')
    c.update()
    assert c.num('T/a') == 5
    assert c.mean('T/a') == 3.0
    assert math.isclose(c.std('T/a'), math.sqrt(2.0))
    c.update() # No new values: previous kept (EDM semantics).
    assert c.num('T/a') == 5

def test_two_ranks_one_allreduce(tmp_path):
    out = tmp_path / 'stats.json'
    proc = launch.subprocess.run(launch.torchrun_cmd('tests/helpers/stats_worker.py', 2) + [str(out)],
        cwd=launch.ROOT, env=launch.env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res['allreduce_calls'] == 1
    first, second = res['first'], res['second']
    assert first['Loss/loss'] == dict(num=6.0, mean=1.5, std=0.5)
    assert first['Progress/kimg'] == dict(num=1.0, mean=7.5, std=0.0)
    assert 'Other/empty' not in first
    # After the first update: Loss/loss had 3 ones and 3 twos; after the second only the two 10s are new.
    assert second['Loss/loss'] == dict(num=2.0, mean=10.0, std=0.0)
    assert second['Progress/kimg'] == dict(num=1.0, mean=7.5, std=0.0)
