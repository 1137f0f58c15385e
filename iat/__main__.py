"""``python -m iat``: the same command line as ``main.py`` and the ``iat`` console script."""

import sys

from iat.app.cli import main

sys.argv[0] = "python -m iat"  # what usage lines and errors name the program
sys.exit(main())
