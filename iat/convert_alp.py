"""``python -m iat.convert_alp``: the public path of ALP checkpoint conversion
(``iat.convert.alp``)."""

import sys

from iat.convert.alp import main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
