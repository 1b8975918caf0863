"""mypy must reject: a str where roi_align's output_size (an int or a pair) is expected."""
import numpy as np

import deformcp

x, boxes = np.zeros((1, 3, 8, 8)), np.zeros((2, 5))
deformcp.roi_align(x, boxes, output_size="7")  # error: [arg-type]
