"""`python -m pretrain RECIPE.yaml [key=value ...]` and its commands: embed, export, publish."""

from __future__ import annotations

import sys

from core.errors import ArgumentParser, dispatch, run_cli

COMMANDS = {
    "embed": ("pretrain.embed:main", "BACKBONE AUDIO_OR_SHARDS... --out FILE.npz   clip embeddings for downstream use"),
    "export": ("pretrain.train:export_main",
               "RUN/checkpoints/step-N [--out DIR]   a checkpoint's backbone as a Hub folder (RUN/backbone-step-N)"),
    "publish": ("pretrain.__main__:publish_main",
                "DIR --repo-id USER/NAME [--private] [--dry-run]   upload a backbone folder to the Hub"),
}
TRAIN = ("pretrain.train:main", "RECIPE.yaml [key=value ...] [--print-recipe]   pretrain a backbone (under accelerate launch too)")


def publish_main(argv: list[str]) -> int:
    """Upload a backbone folder to the Hugging Face Hub as one commit."""
    from pretrain.hub import publish

    parser = ArgumentParser(prog="python -m pretrain publish", description=publish_main.__doc__)
    parser.add_argument("directory", help="a backbone folder: <output_dir>/backbone of a pretraining run")
    parser.add_argument("--repo-id", required=True, help="USER/NAME on the Hub; created when missing")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--dry-run", action="store_true", help="only list the files that would be uploaded")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or `hf auth login`)")
    args = parser.parse_args(argv)
    files = publish(args.directory, args.repo_id, private=args.private, dry_run=args.dry_run, token=args.token)
    verb = "would upload" if args.dry_run else "uploaded"
    print(f"{verb} {len(files)} files to https://huggingface.co/{args.repo_id}:")
    for name in files:
        print(f"  {name}")
    return 0


def main(argv: list[str] | None = None) -> int | None:
    return dispatch(sys.argv[1:] if argv is None else argv, prog="python -m pretrain", commands=COMMANDS, default=TRAIN)


if __name__ == "__main__":
    run_cli(main)
