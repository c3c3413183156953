# medEDM test helper: an EDM loss that waits while a file exists, from its
# `block_after`-th call on (sleeping `delay` s per call before that), so a test
# can act on a live run at a known point. The wait never touches the numbers:
# the run ends with the weights it would have had without it.

import os
import time

from training.loss import EDMLoss

class HoldLoss(EDMLoss):
    def __init__(self, hold='', block_after=0, delay=0.0, **kwargs):
        super().__init__(**kwargs)
        self.hold, self.block_after, self.delay = hold, block_after, delay
        self.calls = 0

    def __call__(self, net, batch, augment_pipe=None):
        self.calls += 1
        if self.hold and os.path.exists(self.hold):
            time.sleep(self.delay)
            while self.calls > self.block_after and os.path.exists(self.hold):
                time.sleep(0.05)
        return super().__call__(net, batch, augment_pipe)
