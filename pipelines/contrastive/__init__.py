"""Contrastive data: sources -> per-row validation -> dedup -> valid/ + quarantine/ (+ report)."""
