"""Integrations with serving frameworks; each imports its optional dependencies itself."""
