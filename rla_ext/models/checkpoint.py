"""Loading released RLA-Net checkpoints (and our own) with an explanation of every mismatch."""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

# Wrappers that prefix every key: DataParallel / DistributedDataParallel, and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_SHOW = 12


class CheckpointMismatchError(ValueError):
    """A checkpoint's keys or shapes do not match the model; the message lists what differs."""


def _unwrap(obj: Any) -> dict[str, Tensor]:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise TypeError("expected a state_dict (name -> tensor) or a checkpoint dict holding one under "
                        "'state_dict'")
    out = dict(obj)
    changed = True
    while changed:  # a DataParallel model that was also compiled stacks prefixes
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if out and all(k.startswith(prefix) for k in out):
                out = {k[len(prefix):]: v for k, v in out.items()}
                changed = True
    return out


def _listing(title: str, items: list[str]) -> str:
    more = f"\n    ... and {len(items) - _SHOW} more" if len(items) > _SHOW else ""
    return f"  {title} ({len(items)}):\n" + "\n".join(f"    {i}" for i in items[:_SHOW]) + more


def _hints(missing: list[str], unexpected: list[str], shapes: list[str]) -> list[str]:
    hints = []
    if any(".eca." in k for k in unexpected):
        hints.append("the checkpoint has ECA layers: build an ECA variant (e.g. arch='rla_ecanet50')")
    if any(".se." in k for k in unexpected):
        hints.append("the checkpoint has SE layers: build an SE variant (e.g. arch='rla_senet50')")
    if any(".eca." in k for k in missing) or any(".se." in k for k in missing):
        hints.append("the model has SE/ECA layers the checkpoint lacks: build the plain variant")
    if any(k.startswith("stages.") for k in missing + unexpected) and not any(".se." in k or ".eca." in k
                                                                             for k in missing + unexpected):
        hints.append("block counts differ: check the depth (50 / 101 / 152)")
    if any(s.startswith("fc.") for s in shapes):
        hints.append("the classifier shape differs: pass num_classes= matching the checkpoint")
    if any("conv1.weight" in s and s.startswith("stages.") for s in shapes):
        hints.append("block conv1 widths differ: check rla_channel= or ResNet vs ResNeXt (groups/width)")
    return hints


def explain_mismatch(model: nn.Module, state_dict: Mapping[str, Tensor]) -> str | None:
    """None when `state_dict` loads into `model` with strict=True, else a readable explanation."""
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in own)
    shapes = sorted(f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in own if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape))
    if not (missing or unexpected or shapes):
        return None
    parts = [f"checkpoint does not match {type(model).__name__} ({len(own)} entries in the model, "
             f"{len(state_dict)} in the checkpoint):"]
    for title, items in (("missing from the checkpoint", missing), ("unexpected in the checkpoint", unexpected),
                         ("shape mismatches", shapes)):
        if items:
            parts.append(_listing(title, items))
    hints = _hints(missing, unexpected, shapes)
    if hints:
        parts.append("  hints: " + "; ".join(hints))
    return "\n".join(parts)


def load_published(path_or_state_dict: str | os.PathLike | Mapping[str, Any], arch: str | nn.Module,
                   **model_kwargs: Any) -> nn.Module:
    """Build `arch` and load a released checkpoint into it with strict=True.

    Args:
        path_or_state_dict: a file saved by torch.save, or an already-loaded object: either a plain
            state_dict or a checkpoint dict with the weights under 'state_dict' (as released).
            'module.' prefixes (DataParallel) and '_orig_mod.' (torch.compile) are stripped.
        arch: a registered model name (see ``rla_ext.models.list_models()``) or a model instance.
        model_kwargs: constructor keywords when `arch` is a name (num_classes, backend, ...).
    Returns the model, in eval mode. Raises CheckpointMismatchError naming every missing,
    unexpected and wrongly shaped entry, with hints on the likely cause.
    """
    from rla_ext.models.zoo import get_model

    if isinstance(path_or_state_dict, (str, os.PathLike)):
        obj = torch.load(path_or_state_dict, map_location="cpu", weights_only=True)
    else:
        obj = path_or_state_dict
    state = _unwrap(obj)
    if isinstance(arch, nn.Module):
        model = arch
    else:
        model = get_model(arch, **model_kwargs)
    problem = explain_mismatch(model, state)
    if problem is not None:
        raise CheckpointMismatchError(problem)
    model.load_state_dict(state, strict=True)
    return model.eval()
