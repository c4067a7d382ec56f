"""Evaluation beside the method: likelihoods (the canonical ones of DESIGN.md 2.2-2.3, and the
multi-view sums of section 5), lm-evaluation-harness, token efficiency and the paper's tables.
Run its scripts from the repository root as modules: `python -m evals.harness --out_dir=out`."""
