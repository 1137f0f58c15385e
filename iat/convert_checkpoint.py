"""``python -m iat.convert_checkpoint``: the public path of timm / torchvision checkpoint conversion
(``iat.convert.checkpoint``)."""

import sys

from iat.convert.checkpoint import main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
