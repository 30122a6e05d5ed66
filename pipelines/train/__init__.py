"""The training runtime: one runner base (`runner.py`) and the jobs built on it (`pretrain.py`, `contrastive.py`)."""
