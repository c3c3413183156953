# medEDM: diffusion-model training toolkit for medical imaging.

"""Brain MRI unsupervised anomaly detection: cDDPM (encoder-conditioned) and
the patched DDPM (noise inside a box), in EDM form (Behrendt et al. 2023/2025).

Importing the package registers the 'simplex' noise source of the loss
objects (training.loss.register_noise)."""

from training import loss as _loss
from training.anomaly import simplex as _simplex

_loss.register_noise('simplex', _simplex.simplex_like)
