"""Runnable examples; importable from the repository root (`examples.fraud_models:predict_v3`)."""
