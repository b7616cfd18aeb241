"""Model-card templates for DSLA checkpoints (Jinja, rendered by `huggingface_hub.ModelCard.from_template`)."""

from __future__ import annotations

from pathlib import Path

DEFAULT_TEMPLATE = "dsla_model_card.md"


def template_path(name: str = DEFAULT_TEMPLATE) -> Path:
    """Path of a template shipped in this package."""
    path = Path(__file__).parent / name
    if not path.is_file():
        available = sorted(p.name for p in Path(__file__).parent.glob("*.md"))
        raise FileNotFoundError(f"No model-card template {name!r}; available: {available}")
    return path
