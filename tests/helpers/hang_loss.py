# medEDM test helper: an EDM loss whose rank `hang_rank` stops responding (sleeps a minute) at its first step.

import time

from torch_utils import distributed as dist
from training.loss import EDMLoss

class HangOnRankLoss(EDMLoss):
    def __init__(self, hang_rank=1, **kwargs):
        super().__init__(**kwargs)
        self.hang_rank = hang_rank

    def __call__(self, net, batch, augment_pipe=None):
        if dist.get_rank() == self.hang_rank:
            time.sleep(60) # Far beyond the test's timeout_sec; bounded, should a failed test orphan this rank.
        return super().__call__(net, batch, augment_pipe)
