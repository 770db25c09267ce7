"""The verdicts: eval_parity's and release's gates, and release's plots."""
