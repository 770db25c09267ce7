"""The parity ladder: one function a rung, and the metrics and per-photo table eval_parity writes."""
