"""CUDA sources of deformcp's kernels (*.cu, *.cuh), shipped as package data of deformcp.kernels."""
