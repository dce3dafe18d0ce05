"""`python -m finetune RECIPE.yaml [key=value ...]` and its commands: evaluate, predict, calibrate, serve, plot-embeddings,
yardsticks."""

from __future__ import annotations

import sys

from core.errors import dispatch, run_cli

COMMANDS = {
    "evaluate": ("finetune.evaluate:main",
                 "MODEL [MODEL ...] DATA [--out DIR] [--aggregate mean|max] [--hop-seconds S]   score a model (or several "
                 "as an ensemble) on labelled files"),
    "predict": ("finetune.predict:main",
                "MODEL FILE_OR_FOLDER... [--timeline] [--out predictions.jsonl]   name the instruments in audio"),
    "calibrate": ("finetune.calibrate:main",
                  "MODEL DATA... --out NEW_MODEL [--match pooled|instrument]   thresholds for a collection, from its audio"),
    "serve": ("finetune.serve:main", "MODEL [--host 127.0.0.1] [--port 8000] [--max-seconds N]   an HTTP API and page"),
    "plot-embeddings": ("finetune.evaluate:plot_embeddings_main",
                        "MODEL DATA --out FILE.png [--method tsne|pca]   a 2-D map of the model's clip embeddings"),
    "yardsticks": ("finetune.yardsticks:main",
                   "TRAIN_SHARDS VAL_SHARDS TEST_DATA [--out FILE.json]   no-information and log-mel regression scores"),
}
TRAIN = ("finetune.train:main",
         "RECIPE.yaml [backbone=PATH_OR_HUB_ID] [key=value ...] [--print-recipe]   fine-tune (under accelerate launch too)")


def main(argv: list[str] | None = None) -> int | None:
    return dispatch(sys.argv[1:] if argv is None else argv, prog="python -m finetune", commands=COMMANDS, default=TRAIN,
                    footer="MODEL is <output_dir>/model of a fine-tuning run; DATA is an IRMAS test folder or test shards.")


if __name__ == "__main__":
    run_cli(main)
