# medEDM: make the repository root importable from the tests.

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest
import torch

# One torch thread for a module of small problems: as fast, and immune to a
# busy machine's thread oversubscription (use with pytest.mark.usefixtures).
@pytest.fixture(scope='module')
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
