"""Defenses: input transforms attacked through BPDA/EOT (``transforms``), embedding-space
defenses (``embedding``) and the model-level defenses of ``registry``, each a module that
registers itself on import (below)."""

from iat.defenses import sparse_frontend  # noqa: F401
