"""`python -m vbshare.train ...` — see vbshare/train/app.py."""
from .app import main

if __name__ == "__main__":
    main()
