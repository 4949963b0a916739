"""Evaluation: I3D detector, Fréchet Video Distance (CLI: python -m evals.fvd), reconstruction metrics."""
