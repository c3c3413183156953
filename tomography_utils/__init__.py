# medEDM: diffusion-model training toolkit for medical imaging.

"""Tomography toolbox for PET: sparse parallel-beam projector with an on-disk
cache (`projector`), batched MLEM/OSEM (`mlem`) and dose simulation (`dose`)."""
