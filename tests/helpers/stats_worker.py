# medEDM test helper (torchrun): training_stats over gloo ranks.

import json
import sys

import torch

from torch_utils import distributed as dist
from torch_utils import training_stats

dist.init(timeout_sec=60)
rank = dist.get_rank()
training_stats.report('Loss/loss', torch.full([3], float(rank + 1)))   # rank 0: 1,1,1; rank 1: 2,2,2
training_stats.report0('Progress/kimg', 7.5)
training_stats.report('Other/empty', [])
collector = training_stats.Collector(regex='.*')
calls = []
orig = torch.distributed.all_reduce
torch.distributed.all_reduce = lambda *a, **k: (calls.append(1), orig(*a, **k))[1]
collector.update()
torch.distributed.all_reduce = orig
first = collector.as_dict()
training_stats.report('Loss/loss', torch.tensor([10.0]))
collector.update()
second = collector.as_dict()
if rank == 0:
    with open(sys.argv[1], 'w') as f:
        json.dump(dict(first=first, second=second, allreduce_calls=len(calls)), f)
dist.shutdown(0)
