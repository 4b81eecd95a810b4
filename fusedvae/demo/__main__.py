"""``python -m fusedvae.demo``: the same as ``python -m fusedvae demo``."""
import sys

from . import main

sys.exit(main())
