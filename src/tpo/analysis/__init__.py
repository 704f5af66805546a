"""The analysis layer: evaluate, export and report results that tpo wrote."""
