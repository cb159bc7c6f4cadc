"""Running models fast, and measuring it: the one table of inference paths and grouped-conv
lowerings (:mod:`.paths`, torch-free), the one timer (:mod:`.timing`), batch norm folded
(:mod:`.fold`), the inference paths (:mod:`.deploy`), deployment files (:mod:`.export`),
the benchmarks (:mod:`.bench`) and the roofline bounds (:mod:`.roofline`). The GPU kernels
the Triton paths run are :mod:`deeproots.kernels`. Importing this package loads nothing of
torch (the command line reads :mod:`.paths` for its choices)."""
