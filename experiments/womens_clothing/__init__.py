"""See README.md; run with ``python -m experiments.womens_clothing.run`` from the repository root."""
