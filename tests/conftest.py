import os

import torch

# Triton kernels run on CPU tensors only through Triton's interpreter, which must be switched on
# before any kernel is defined, i.e. before rla_ext.triton_kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
