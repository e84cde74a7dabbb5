"""CoDA-GQA-L: differential grouped-query attention with a fixed-size inference state.

Public names only (docs/api.md); each lives in a module named after its one job.
"""

from .attention import BoundedCoDAAttention, CoDAGQALandmarkPerf2
from .baseline import BaselineGQA, CoDAGQA, KVCache
from .config import BoundedConfig
from .primitives import HeadwiseRMSNorm, RMSNorm, RotaryEmbedding, apply_rope, repeat_kv
from .state import BoundedState
from .statefile import StateFileError, load_state, module_fingerprint, read_state_metadata, save_state
from .version import __version__

CoDAGQALandmarkStatePerf2 = BoundedState

# Names that need transformers (the "models" extra) are imported on first use.
_MODEL_NAMES = (
    "BoundedCache",
    "EveCoDAAdapter",
    "GenericCoDAAdapter",
    "LlamaCoDAAdapter",
    "Qwen3CoDAAdapter",
    "convert",
)


def __getattr__(name: str) -> object:
    if name in _MODEL_NAMES:
        from . import models

        return getattr(models, name)
    if name == "NeuralDatabase":
        from .neuraldb import NeuralDatabase

        return NeuralDatabase
    raise AttributeError(f"module 'coda_gqa_l' has no attribute {name!r}")


__all__ = [
    "BaselineGQA",
    "BoundedCache",
    "EveCoDAAdapter",
    "GenericCoDAAdapter",
    "LlamaCoDAAdapter",
    "NeuralDatabase",
    "Qwen3CoDAAdapter",
    "convert",
    "BoundedCoDAAttention",
    "BoundedConfig",
    "BoundedState",
    "CoDAGQA",
    "CoDAGQALandmarkPerf2",
    "CoDAGQALandmarkStatePerf2",
    "HeadwiseRMSNorm",
    "KVCache",
    "RMSNorm",
    "RotaryEmbedding",
    "StateFileError",
    "__version__",
    "apply_rope",
    "load_state",
    "module_fingerprint",
    "read_state_metadata",
    "repeat_kv",
    "save_state",
]
