"""python -m iat.data.make_shards DIR OUT --shard-size N: see ``iat.data.shards``."""

import sys

from iat.data.shards import main

if __name__ == "__main__":
    sys.exit(main())
