# medEDM: diffusion-model training toolkit for medical imaging.
