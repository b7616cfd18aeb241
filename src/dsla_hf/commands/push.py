"""`dsla push`: a DSLA checkpoint's Hub repository (weights, remote code, model card), written and uploaded."""

from __future__ import annotations

import argparse

from ..hub import PublishError, build_repo_folder, discover_inputs, hub_offline, push_to_hub, resolve_token


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", help="a saved DSLA checkpoint folder (e.g. dsla_demo/checkpoint)")
    parser.add_argument("repo_id", help="the Hub repository, e.g. your-name/SmolLM2-135M-DSLA")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--dry-run", metavar="OUT_DIR", default=None, help="write the repository folder only")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --dry-run folder")
    parser.add_argument(
        "--token-env", metavar="NAME", default=None, help="read the token from this variable (default: HF_TOKEN)"
    )
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the checkpoint's own)")
    parser.add_argument("--results", default=None, help="evaluation results JSON (default: results.json beside)")
    parser.add_argument("--metrics", default=None, help="training metrics JSON (default: the checkpoint's chain.json)")
    parser.add_argument("--base-model", default=None, help="the teacher's Hub id (recognised for SmolLM2)")
    parser.add_argument("--license", default=None, help="licence id (default: the teacher's)")
    parser.add_argument("--dataset", action="append", default=[], help="Hub id of a training dataset (repeatable)")
    parser.add_argument("--tag", action="append", default=[], help="extra tag (repeatable)")
    parser.add_argument("--seq-len", type=int, default=None, help="training sequence length (token budget)")
    parser.add_argument("--endpoint", default=None, help="Hub endpoint (default: HF_ENDPOINT or huggingface.co)")
    parser.add_argument("--message", default="Upload DSLA checkpoint", help="commit message")


def run(args: argparse.Namespace) -> int:
    from huggingface_hub.errors import HfHubHTTPError

    try:
        if args.dry_run is None:  # fail fast, before loading anything
            if hub_offline():
                push_to_hub(args.model_dir, args.repo_id)  # raises the offline error
            resolve_token(token_env=args.token_env)
        inputs = discover_inputs(
            args.model_dir,
            results=args.results,
            training=args.metrics,
            repo_id=args.repo_id,
            base_model=args.base_model,
            license=args.license,
            datasets=args.dataset,
            tags=args.tag,
            seq_len=args.seq_len,
        )
        if args.dry_run is not None:
            folder = build_repo_folder(
                args.model_dir, args.dry_run, tokenizer=args.tokenizer, inputs=inputs, overwrite=args.overwrite
            )
            files = sorted(p.name for p in folder.iterdir())
            print(f"dry run: wrote {len(files)} files to {folder} (nothing uploaded): {', '.join(files)}")
            return 0
        info = push_to_hub(
            args.model_dir,
            args.repo_id,
            private=args.private,
            token_env=args.token_env,
            tokenizer=args.tokenizer,
            inputs=inputs,
            endpoint=args.endpoint,
            commit_message=args.message,
        )
    except PublishError as err:
        print(f"dsla push: error: {err}")
        return 2
    except HfHubHTTPError as err:  # the server's answer (status, message, request id); never the token
        print(f"dsla push: the Hub refused: {err}")
        return 1
    visibility = "private" if args.private else "public"
    print(f"pushed {args.model_dir} to {args.repo_id} ({visibility}): {info.commit_url}")
    return 0
