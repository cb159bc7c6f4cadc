"""``python -m deeproots`` (and ``torchrun -m deeproots``) runs the command line."""
import sys

from .cli import main

sys.exit(main())
