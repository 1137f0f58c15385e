#!/usr/bin/env python
"""Per-machine ImageNet data server (the original's entry script): see ``iat.data.server``.

python third_party/serve-data.py --data /path/to/imagenet --batch 32
"""

import sys
from pathlib import Path

# Importable from a clone without installing: the repository root holds the ``iat`` package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from iat.data.server import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
