"""Triton kernels of fnn and their launchers.

Import the submodules you need: `kernels.linear_act` imports triton; `kernels.checks` and
`kernels.configs` do not.
"""
