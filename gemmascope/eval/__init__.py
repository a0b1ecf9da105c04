"""Evaluation per SPEC.md section 6: L0, FVU, frequencies, and delta LM loss by splicing."""
