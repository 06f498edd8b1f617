"""See README.md; run with ``python -m experiments.survival_gse7390.run`` from the repository root."""
