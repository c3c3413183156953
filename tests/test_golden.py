# medEDM: golden values of EDM's mechanics (NVlabs/edm behaviour, fixed seeds).

import itertools

import pytest
import torch

from torch_utils import misc
from training import sampling
from training.training_loop import ema_beta, _lr_factor

#----------------------------------------------------------------------------

def test_edm_time_steps_18():
    t = sampling.edm_sigma_steps(18, 0.002, 80, 7)
    assert t.dtype == torch.float64 and len(t) == 19
    expected_head = [80.0, 57.585985, 40.785574, 28.374585]
    expected_tail = [0.022935, 0.007528, 0.002, 0.0]
    assert t[:4].tolist() == pytest.approx(expected_head, abs=1e-6)
    assert t[-4:].tolist() == pytest.approx(expected_tail, abs=1e-6)

def test_edm_time_steps_bad_input():
    with pytest.raises(ValueError, match='num_steps must be >= 1'):
        sampling.edm_sigma_steps(0)
    with pytest.raises(ValueError, match='sigma_min < sigma_max'):
        sampling.edm_sigma_steps(5, sigma_min=1, sigma_max=0.5)

def test_ema_beta_golden():
    # Batch 512, half-life 500 kimg, ramp-up 0.05.
    assert ema_beta(0, 512, 500, 0.05) == 0
    assert ema_beta(512, 512, 500, 0.05) == pytest.approx(9.5367e-7, rel=1e-4)
    assert ema_beta(1_000_000, 512, 500, 0.05) == pytest.approx(0.992927, abs=1e-6)
    assert ema_beta(20_000_000, 512, 500, 0.05) == pytest.approx(0.999290, abs=1e-6)
    assert ema_beta(0, 512, 500, None) == pytest.approx(0.5 ** (512 / 500_000))

def test_lr_schedule():
    total = 100_000
    assert _lr_factor(0, total, 10, 'constant', 0, 0) == 0           # EDM: first step has lr 0.
    assert _lr_factor(5_000, total, 10, 'constant', 0, 0) == 0.5
    assert _lr_factor(50_000, total, 10, 'constant', 0, 0) == 1
    assert _lr_factor(10_000, total, 10, 'cosine', 0, 0.1) == pytest.approx(1)
    assert _lr_factor(total, total, 10, 'cosine', 0, 0.1) == pytest.approx(0.1)
    assert _lr_factor(55_000, total, 10, 'cosine', 0, 0) == pytest.approx(0.5)
    assert _lr_factor(40_000, total, 10, 'isqrt', 10, 0) == pytest.approx(0.5)

def test_infinite_sampler_golden():
    # N=10, seed 0, 2 replicas (NVlabs/edm's windowed reshuffle).
    ranks = [list(itertools.islice(iter(misc.InfiniteSampler(range(10), rank=r, num_replicas=2, seed=0)), 12)) for r in range(2)]
    assert ranks[0] == [2, 4, 1, 2, 0, 7, 1, 6, 3, 2, 9, 7]
    assert ranks[1] == [8, 9, 6, 3, 9, 8, 5, 4, 8, 1, 6, 5]

@pytest.mark.parametrize('start', [0, 1, 7, 33, 150])
def test_infinite_sampler_start_idx(start):
    for rank in range(2):
        full = list(itertools.islice(iter(misc.InfiniteSampler(range(13), rank=rank, num_replicas=2, seed=3)), 200))
        part = list(itertools.islice(iter(misc.InfiniteSampler(range(13), rank=rank, num_replicas=2, seed=3, start_idx=start)), 100))
        # Global index g belongs to rank g % 2; rank-local position of global index `start`:
        offset = (start + (1 - rank)) // 2 if rank == 1 else (start + 1) // 2
        assert part == full[offset:offset + 100]

def test_seed_split_across_ranks():
    # Seeds 0-9, batch 3, world 2 (EDM's generate.py).
    assert sampling.split_seeds(list(range(10)), 3, 0, 2) == [[0, 1, 2], [6, 7]]
    assert sampling.split_seeds(list(range(10)), 3, 1, 2) == [[3, 4, 5], [8, 9]]
    assert sampling.split_seeds(list(range(10)), 64, 0, 1) == [list(range(10))]

def test_step_seed_is_stable():
    # Pinned values: every process and every resumed run must draw the same streams for the same keys.
    assert misc.step_seed(0, 0, 0, 0) == 7896617691693857887
    assert misc.step_seed(1, 0, 8, 0) == 8210927908896119760
    assert misc.step_seed(3, 1, 1024, 2) == 1233374149778606569
    assert misc.step_seed(2**40, 3, 10**9) == 2598104367248486358
    misc.set_random_seed(3, 1, 1024, 2)
    assert torch.rand(3).tolist() == [0.9223877787590027, 0.3939303159713745, 0.8051825165748596]
    assert len({misc.step_seed(1, r, n, 0) for r in range(2) for n in (0, 8, 16)}) == 6
    assert 0 <= misc.step_seed(2**40, 3, 10**9) < 2**63

#----------------------------------------------------------------------------

@pytest.mark.parametrize('text, expected', [
    ('0-3', [0, 1, 2, 3]), ('0,3,10-12', [0, 3, 10, 11, 12]), (5, [5]), ([0, 2, 5], [0, 2, 5]), ('7', [7]),
])
def test_parse_int_list(text, expected):
    assert misc.parse_int_list(text) == expected

@pytest.mark.parametrize('text, message', [
    ('5-3', "sampling.seeds: bad range '5-3': start 5 is greater than end 3"),
    ('a-b', "sampling.seeds: bad range 'a-b': expected an integer like 5 or a range like 0-63"),
    ('1,,2', "sampling.seeds: bad range '': expected an integer like 5 or a range like 0-63"),
    ('', "sampling.seeds: expected integers or ranges like 0-63, got ''"),
])
def test_parse_int_list_errors(text, message):
    with pytest.raises(ValueError) as err:
        misc.parse_int_list(text, 'sampling.seeds')
    assert str(err.value) == message

def test_format_time():
    assert misc.format_time(5) == '5s'
    assert misc.format_time(85) == '1m 25s'
    assert misc.format_time(2 * 3600 + 3 * 60 + 4) == '2h 03m 04s'
    assert misc.format_time(26 * 3600 + 3 * 60) == '1d 02h 03m'
