"""Kernel tests run the Triton kernels on CPU tensors through the interpreter unless told otherwise
(``TRITON_INTERPRET=0`` on a GPU machine). Must be set before anything imports triton."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
