# medEDM test helper: an npz dataset whose items carry an `embedding` vector
# (the batch key of the network's embedding path), read from the npz array
# `embedding` (N, E).

import numpy as np

from training.dataset import NpzDataset

class EmbeddingNpzDataset(NpzDataset):
    def __init__(self, path, embedding_key='embedding', **kwargs):
        super().__init__(path, **kwargs)
        with np.load(path) as npz:
            self._embedding = npz[embedding_key].astype(np.float32)

    def __getitem__(self, idx: int) -> dict:
        item = super().__getitem__(idx)
        item['embedding'] = self._embedding[item['idx']]
        return item
