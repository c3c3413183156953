# medEDM: diffusion-model training toolkit for medical imaging.

"""3-D latent diffusion for brain MRI inpainting (BraTS 2023 "Local Synthesis
of Healthy Brain Tissue via Inpainting"): a 3-D KL autoencoder trained as its
own stage (`autoencoder`), a latent EDM with the engine's DhariwalUNet3D
conditioned on the voided image's latent, the mask, a growth map and the
tissue segmentation (`latent`), the BraTS inpainting data layout with its
conditioning folders and a builder of such cases from the MNI152 template
(`data`, `synth`), NIfTI output with the input's header (`nifti`), and the
`evaluate.py inpaint` command with the challenge's own metrics
(`evaluation`). The engine (training/*.py) never imports this package."""
