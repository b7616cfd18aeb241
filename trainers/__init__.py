"""Training of DSLA layers: the layer-alone stage, the distillation trainer (on TRL's `SFTTrainer`) and the chain.

Imported lazily: `dsla_hf.trainers.layer_alone` needs torch only; the trainer and the chain need `trl`.
"""

import importlib

_EXPORTS = {
    "DSLADistillConfig": "distill",
    "DSLADistillTrainer": "distill",
    "ChainConfig": "chain",
    "ChainRecipe": "chain",
    "run_chain": "chain",
    "fit_layer_alone": "layer_alone",
    "capture_layer_io": "layer_alone",
}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(name)


__all__ = list(_EXPORTS)
