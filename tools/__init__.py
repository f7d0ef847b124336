"""Scripts beside the main five, each run from the repository root as python tools/<name>.py: benchmarks, the comparison, the prior inspector, the GPU self-check."""
