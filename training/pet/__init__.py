# medEDM: diffusion-model training toolkit for medical imaging.

"""PET dose enhancement family (conditional EDM): the dataset of full-dose /
low-dose MLEM pairs (`dataset`), brain activity phantoms from the MNI152 maps
(`phantoms`) and the `evaluate.py pet` command with its metrics (`evaluation`).
The engine (training/*.py) never imports this package."""
