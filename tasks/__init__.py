"""Offline lm-eval tasks made from the validation splits; see README.md."""
