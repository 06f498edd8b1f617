"""See README.md; run with ``python -m experiments.evidential_mfeat.run`` from the repository root."""
