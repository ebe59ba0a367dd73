"""Multi-seed experiments: seeds, sweeps of config variants, significance tests, reports."""
