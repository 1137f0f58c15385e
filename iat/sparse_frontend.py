"""``python -m iat.sparse_frontend``: the public path of the sparse-coding frontend's commands
(``iat.defenses.sparse_frontend``)."""

import sys

from iat.defenses.sparse_frontend import main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
