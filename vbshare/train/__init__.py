"""The Hydra training app: `python -m vbshare.train +adapter=vblora` (see loop.py; configs/ at the repo root)."""
from .loop import CONFIG_DIR, main, run_training

__all__ = ["CONFIG_DIR", "main", "run_training"]
