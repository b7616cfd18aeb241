"""The `dsla` command line: one module per sub-command in `dsla_hf.commands`, imported only when used."""

from __future__ import annotations

import argparse
import importlib
import sys

# sub-command -> module defining `add_arguments(parser)` and `run(args) -> int | None`
COMMANDS = {
    "demo": ("dsla_hf.commands.demo", "Rank, distil, evaluate and save on the embedded SmolLM2 teacher"),
    "rank": (
        "dsla_hf.commands.rank",
        "Rank layers by sensitivity (attention entropy or measured loss) for conversion",
    ),
    "distill": ("dsla_hf.commands.distill", "Chained layer-by-layer distillation in ranking order (resumable)"),
    "serve": ("dsla_hf.commands.serve", "OpenAI-compatible server that converts layers to DSLA as load grows"),
    "replay": ("dsla_hf.commands.replay", "Replay the Azure 2023 LLM traces against a server; vLLM benchmark report"),
    "eval": (
        "dsla_hf.commands.eval",
        "Perplexity, passkey, RULER needles, attention maps, speed: JSON, Markdown, plots",
    ),
    "ablate": (
        "dsla_hf.commands.ablate",
        "The dual-state ablation: window {0, 64} x {DSLA, GLA, GLA-fast}, demo recipe",
    ),
    "push": (
        "dsla_hf.commands.push",
        "Write a DSLA checkpoint's Hub repository (weights, remote code, card) and upload it",
    ),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dsla", description="Dual-state linear attention for Transformers")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module_name).add_arguments(sub)
    args = parser.parse_args(argv)
    return importlib.import_module(COMMANDS[args.command][0]).run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
