"""``python -m iat.export_sharded``: a sharded (--fsdp) checkpoint as single-file weights
(``iat.convert.sharded``)."""

import sys

from iat.convert.sharded import main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
