import os

import torch

# Triton kernels run on CPU tensors only through Triton's interpreter, which must be switched on
# before any kernel is defined, i.e. before rla_ext.triton_kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # cuDNN convolutions default to TF32 for float32 (a 10-bit mantissa), which put the float32
    # reference 2e-4..1e-3 away from the fused kernels on an H200 (those use IEEE float32 unless
    # torch's *matmul* precision allows TF32): the references here are IEEE float32 on every device.
    torch.backends.cudnn.allow_tf32 = False

# Property-based tests: a small, reproducible "ci" profile by default; HYPOTHESIS_PROFILE=dev
# explores many more examples locally.
try:
    from hypothesis import settings
except ImportError:  # hypothesis is a test extra; the property tests skip themselves without it
    pass
else:
    settings.register_profile("ci", max_examples=20, deadline=None, derandomize=True, print_blob=True)
    settings.register_profile("dev", max_examples=500, deadline=None, print_blob=True)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

from rla_testing import one_thread  # noqa: E402,F401  (fixture shared by the model-level folders)
