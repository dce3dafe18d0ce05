"""`python -m finetune RECIPE.yaml [key=value ...]`, `... evaluate`, `... predict`, `... serve`, `... embed`."""

from __future__ import annotations

import sys

from core.errors import run_cli

USAGE = """usage:
  python -m finetune RECIPE.yaml [backbone=PATH_OR_HUB_ID] [key=value ...]   fine-tune (under accelerate launch too)
  python -m finetune evaluate MODEL DATA [--out DIR] [--aggregate mean|max] [--hop-seconds S]
  python -m finetune predict MODEL FILE_OR_FOLDER... [--timeline] [--out predictions.jsonl]
  python -m finetune serve MODEL [--host 127.0.0.1] [--port 8000] [--max-seconds N]
  python -m finetune embed MODEL DATA --out FILE.png [--method tsne|pca]
  python -m finetune yardsticks TRAIN_SHARDS VAL_SHARDS TEST_DATA [--out FILE.json]

MODEL is <output_dir>/model of a fine-tuning run; DATA is an IRMAS test folder or test shards."""


def main(argv: list[str] | None = None) -> int | None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] == "evaluate":
        from finetune.evaluate import main as evaluate_main

        return evaluate_main(argv[1:])
    if argv[0] == "embed":
        from finetune.evaluate import embed_main

        return embed_main(argv[1:])
    if argv[0] == "yardsticks":
        from finetune.yardsticks import main as yardsticks_main

        return yardsticks_main(argv[1:])
    if argv[0] == "serve":
        from finetune.serve import main as serve_main

        return serve_main(argv[1:])
    if argv[0] == "predict":
        from finetune.predict import main as predict_main

        return predict_main(argv[1:])
    from finetune.train import main as train_main

    return train_main(argv)


if __name__ == "__main__":
    run_cli(main)
