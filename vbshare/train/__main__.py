"""`python -m vbshare.train ...` — see vbshare/train/loop.py."""
from .loop import main

if __name__ == "__main__":
    main()
