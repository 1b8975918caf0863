"""mypy must reject: a deformcp result used as an int (results are arrays: deformcp.Array)."""
import numpy as np

import deformcp

loss: float = deformcp.mimic_loss(np.ones((2, 3)), np.ones((2, 3)))  # error: [assignment]
