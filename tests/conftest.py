"""Suite-wide setting: without a GPU, tritondecode.py's Triton kernels run in Triton's interpreter, which
Triton chooses when a kernel is defined (at import), so it is switched on here, before any test imports them."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

