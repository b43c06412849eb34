"""The network (:mod:`~stlib.model.net`), its losses (:mod:`~stlib.model.losses`) and the
post-processing (:mod:`~stlib.model.postproc`).

Names are imported lazily, so ``import stlib.model.postproc`` does not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "HoVerNet": "stlib.model.net", "NetConfig": "stlib.model.net", "build_model": "stlib.model.net",
    "load_model": "stlib.model.net", "count_params": "stlib.model.net", "model_flops": "stlib.model.net",
    "LossWeights": "stlib.model.losses", "hovernet_loss": "stlib.model.losses",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'stlib.model' has no attribute {name!r}")
