# medEDM test helper: a loss object with trainable parameters (as later model
# families have): EDMLoss weighted by a learned log-variance u(sigma) of the
# noise level, loss / e^u + u (the uncertainty weighting of Kendall et al. 2018).

import torch

from torch_utils import persistence
from training.loss import EDMLoss

# Snapshots may name only persistent classes of the project's packages; this test module joins them.
persistence.PROJECT_PACKAGES = persistence.PROJECT_PACKAGES + (__name__,)

@persistence.persistent_class
class LearnedWeightLoss(EDMLoss, torch.nn.Module):
    def __init__(self, **kwargs):
        torch.nn.Module.__init__(self)
        EDMLoss.__init__(self, **kwargs)
        self.logvar = torch.nn.Linear(1, 1) # Randomly initialised: every rank must start from the same values.

    def sample_sigma(self, shape, device):
        self.sigma = super().sample_sigma(shape, device)
        return self.sigma

    def __call__(self, net, batch, augment_pipe=None):
        loss = super().__call__(net, batch, augment_pipe)
        u = self.logvar(self.sigma.log().reshape(-1, 1)).reshape(self.sigma.shape)
        return loss / u.exp() + u
