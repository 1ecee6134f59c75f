"""rla_ext: fused kernels for Recurrent Layer Aggregation (RLA-Net).

    import rla_ext
    out = rla_ext.ops.concat_conv_bn_act(x, h, w, gamma, beta, rm, rv, training=True)
    with rla_ext.use_backend("cpp"):
        model = rla_ext.models.rla_resnet50(num_classes=1000)
"""
from __future__ import annotations

__version__ = "0.1.0"

from rla_ext._backend import (  # noqa: E402
    BACKENDS,
    BackendUnavailableError,
    available_backends,
    get_backend,
    set_backend,
    use_backend,
)
from rla_ext.info import build_info  # noqa: E402
from rla_ext import ops  # noqa: E402
from rla_ext import nn, models  # noqa: E402  (after ops: both build on it)

__all__ = ["ops", "nn", "models", "BACKENDS", "BackendUnavailableError", "available_backends", "get_backend",
           "set_backend", "use_backend", "build_info", "__version__"]
