"""The NumPy path: vectorised array code, the float64 reference of kernels/*.cu, one module per kernel family.

Functions take the arrays already imported and checked, and the op's checked configuration (``cfg``);
no dispatch and no validation happen here (deformcp.ops does both).
"""
