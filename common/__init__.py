"""The plumbing the scripts share: settings and one-line errors, checkpoints and results files, torchrun, evaluation sweeps."""
