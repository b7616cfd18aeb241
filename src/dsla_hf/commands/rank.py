"""`dsla rank`: the conversion order of a model's layers, by attention entropy or by measured loss."""

from __future__ import annotations

import argparse

import torch

from ..devices import add_device_arguments, device_and_dtype
from ..loading import load_student
from ..ranking import rank_layers, save_ranking


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2", help="'smollm2' (embedded teacher) or a Llama / DSLA folder")
    parser.add_argument("--method", choices=["entropy", "measured"], default="entropy")
    parser.add_argument(
        "--first", choices=["low", "high"], default="low", help="which end of the scores converts first"
    )
    parser.add_argument("--data", default=None, help="calibration text: offline corpus name, file or hub dataset")
    parser.add_argument("--heldout", default=None, help="held-out text for --method measured")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--samples", type=int, default=8, help="calibration sequences")
    parser.add_argument("--steps", type=int, default=20, help="layer-alone steps per layer (measured)")
    parser.add_argument("--output", default="dsla_ranking", help="folder for ranking_<method>.json/.png")
    parser.add_argument("--save-config", default=None, help="save the converted model with this order here")
    add_device_arguments(parser, dtype_default=None)


def run(args: argparse.Namespace) -> int:
    from ..data import build_datasets

    torch.manual_seed(0)
    student, tokenizer = load_student(args.model, device=device_and_dtype(args)[0])
    train_sources = [args.data] if args.data else None
    calib, heldout = build_datasets(tokenizer, args.seq_len, train_sources, args.heldout, args.samples, 4)
    calib_ids = torch.tensor(calib["input_ids"])
    result = rank_layers(
        student, calib_ids, args.method, torch.tensor(heldout["input_ids"]), args.steps, first=args.first
    )
    json_path, png_path = save_ranking(result, args.output)
    print(f"order ({args.method}): {result['order']}\nwrote {json_path} and {png_path}")
    if args.save_config:
        student.config.conversion_order = result["order"]
        student.save_pretrained(args.save_config)
        tokenizer.save_pretrained(args.save_config)
        print(f"saved the model with conversion_order in {args.save_config}")
    return 0
