"""mypy must reject: a str kernel_size for a deformcp.torch module."""
import deformcp.torch as dtorch

dtorch.DeformConv2d(3, 8, "3")  # error: [arg-type]
