"""The data side: dataset layouts, augmentation, sampling policy, the ZMQ server and client.

Everything here except ``sources`` is torch-free, so that the data server never imports torch.
Importing the package registers the shard layout (``shards``) beside ``layouts``' own.
"""

from iat.data import shards  # noqa: F401
