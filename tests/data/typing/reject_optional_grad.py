"""mypy must reject: a gradient field read without checking for None (None where it was not asked for)."""
import numpy as np

import deformcp

x, grid = np.zeros((1, 1, 4, 4)), np.zeros((1, 4, 4, 2))
grads = deformcp.grid_sample_backward(np.zeros((1, 1, 4, 4)), x, grid, needs_input_grad=(False, True))
print(grads.input.shape)  # error: [union-attr]
