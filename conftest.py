"""Loaded by pytest before any test module is imported: the Triton kernels run on CPU tensors through the
interpreter unless told otherwise (``TRITON_INTERPRET=0`` on a GPU machine). Triton's own library functions
(``tl.sum``...) are decorated when ``triton.language`` is first imported, and anything may import it (torch does,
lazily), so the switch must be set before the first test module loads, not in ``tests/kernels/``."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
