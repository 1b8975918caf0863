"""mypy must reject: a field that the gradients' named tuple does not have."""
import numpy as np

import deformcp

x, grid = np.zeros((1, 1, 4, 4)), np.zeros((1, 4, 4, 2))
print(deformcp.grid_sample_backward(np.zeros((1, 1, 4, 4)), x, grid).theta)  # error: [attr-defined]
