"""``python -m iat.cli``: the public path of the command line, which lives in ``iat.app.cli``."""

import sys

from iat.app.cli import build_parser, config_from_args, main  # noqa: F401

if __name__ == "__main__":
    sys.argv[0] = "python -m iat"
    sys.exit(main())
