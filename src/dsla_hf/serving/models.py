"""Models the server can load: a DSLA checkpoint (folder or hub id), a Llama converted on the fly, the embedded
SmolLM2 teacher (`smollm2`, the default), or `toy` (a tiny random model with a character tokenizer, for tests and
smoke runs: it starts in a second and its text is noise)."""

from __future__ import annotations

import torch

TOY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def toy_tokenizer():
    """A character tokenizer: <pad>=0, </s>=1, <s>=2, then printable ASCII and newline (99 ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="</s>", bos_token="<s>", unk_token="<pad>"
    )
    tok.chat_template = TOY_CHAT_TEMPLATE
    return tok


def toy_config(**overrides):
    """The toy model's Llama config: hidden 64, 4 layers, GQA 4/2, the toy tokenizer's 101 ids (`overrides` win)."""
    from transformers import LlamaConfig

    values = dict(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def toy_model(seed: int = 0, num_layers: int = 4, conversion_order: list[int] | None = None):
    """A tiny random Llama (`toy_config`) converted to DSLA in every layer, none active."""
    from transformers import LlamaForCausalLM

    from ..models.dsla.convert import convert_llama_to_dsla

    torch.manual_seed(seed)
    teacher = LlamaForCausalLM(toy_config(num_hidden_layers=num_layers)).eval()
    order = conversion_order if conversion_order is not None else list(range(num_layers - 1, -1, -1))
    return convert_llama_to_dsla(teacher, layers="all", conversion_order=order, active=[]).eval()


def load_model(spec: str | None, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """(model, tokenizer, name) for `--model`: `toy`, `smollm2` (default), a DSLA checkpoint, or a Llama (converted
    in every layer with untrained DSLA weights); every layer starts as softmax attention."""
    from ..loading import load_dsla

    if spec == "toy":
        return toy_model().to(device=device, dtype=dtype), toy_tokenizer(), "toy"
    model, tokenizer, name = load_dsla(spec, dtype, device)
    model.set_dsla_layers([])
    return model, tokenizer, name
