import os
import sys

import torch

# Tests import the flat top-level files (`import dit`), wherever pytest is started from.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)  # tiny models: one thread is faster than two contending ones
