"""mypy must reject: a NumPy array given to deformcp.torch, whose functions take tensors."""
import numpy as np
import torch

import deformcp.torch as dtorch

dtorch.grid_sample(np.zeros((1, 1, 4, 4)), torch.zeros(1, 4, 4, 2))  # error: [arg-type]
