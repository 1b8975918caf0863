"""mypy must reject: a str where an array is expected (deformcp refuses strings at run time too)."""
import numpy as np

import deformcp

deformcp.grid_sample("image.png", np.zeros((1, 4, 4, 2)))  # error: [arg-type]
