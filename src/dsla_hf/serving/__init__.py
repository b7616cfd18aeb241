"""DSLA-Serve: an OpenAI-compatible server that converts attention layers to DSLA as load and prompt length grow.

- `policy`: the adaptive policy (how many layers run as DSLA), a plain dataclass with no model inside;
- `engine`: one thread that owns the model and batches decode steps across requests;
- `openai_protocol`: validation of OpenAI request bodies and the shapes of responses and errors;
- `metrics`: Prometheus metrics under vLLM's names;
- `server`: the FastAPI app;
- `replay`: the Azure 2023 trace client with vLLM's benchmark report;
- `models`: the models `--model` names, and the toy model of the tests.

Their command lines, `dsla serve` and `dsla replay`, are in `dsla_hf.commands`.
"""

from .policy import AdaptivePolicy, LoadSnapshot, StaticPolicy

__all__ = ["AdaptivePolicy", "LoadSnapshot", "StaticPolicy"]
