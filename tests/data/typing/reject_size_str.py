"""mypy must reject: a str where affine_grid's size (a sequence of ints) is expected."""
import numpy as np

import deformcp

theta = np.zeros((1, 2, 3))
deformcp.affine_grid(theta, "1, 3, 4, 5")  # error: [arg-type]
