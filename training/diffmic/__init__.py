# medEDM: diffusion-model training toolkit for medical imaging.

"""DiffMIC family (Yang et al., MICCAI 2023; DiffMIC-v2, IEEE TMI 2025):
medical image classification by denoising the label. A dual-granularity
classifier (`dcg`: global CNN with a class-activation saliency map, top-k
patches, local branch with gated attention pooling) gives the prior; an EDM in
label space (`loss`: the residual one-hot - prior is noised and denoised,
conditioned on the image and the priors, focal-weighted) refines it
(`inference`); `denoiser` holds an alternative denoiser with the family's
own pooled image encoder (measured, not the demo's). Data in class folders with a seeded stratified split file
(`dataset`), a demo dataset of MNI152 brain slices with lesion classes
(`phantoms`), metrics with calibration (`metrics`), temperature scaling fitted on
the validation split (`calibration`) and `evaluate.py diffmic`
(`evaluation`). The engine (training/*.py) never imports this package."""
