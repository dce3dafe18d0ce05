"""The bad-input zoo, command by command: every mistake a user can make ends in exit status 2 (1 for a partial
success) and one `error:` line on stderr naming the path, and nothing already written is damaged."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from core.errors import run_cli
from finetune.__main__ import main as finetune_main
from pretrain.__main__ import main as pretrain_main
from pretrain.backbone import Backbone, BackboneConfig
from pretrain.hub import save_pretrained
from shards.__main__ import main as shards_main
from shards.pack import PackOptions, pack


def fingerprint(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`: what "nothing was damaged" compares."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def fails(capsys, main, argv: list[str], *, names: tuple = (), code: int = 2) -> str:
    """Run a command line as the entry points do; assert the exit status and one error line naming `names`."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main([str(a) for a in argv]))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning:")]
    assert exit_info.value.code == code, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def zoo(irmas, tmp_path_factory) -> dict[str, Path]:
    """Packed IRMAS-layout shards with a val split, an unlabeled pack, a tiny backbone, a finished fine-tuning
    run, and the usual suspects: a text file, text named .wav, an empty folder, a truncated shard."""
    root = tmp_path_factory.mktemp("zoo")
    irmas.train(root / "irmas", songs_per_class=2, excerpts=1, seconds=1.0, sample_rate=16000)
    quiet = dict(workers=1, progress=False, print_fn=lambda *args, **kwargs: None)
    pack(root / "irmas", root / "shards", options=PackOptions(source="irmas-train", val_fraction=0.5), **quiet)
    (root / "plain").mkdir()
    sf.write(root / "plain" / "a.wav", np.full(16000, 0.1, dtype=np.float32), 16000)
    pack(root / "plain", root / "unlabeled", options=PackOptions(source="folder"), **quiet)
    torch.manual_seed(0)
    backbone = save_pretrained(Backbone(BackboneConfig(hidden_size=64, num_layers=1, num_heads=2,
                                                       intermediate_size=128, max_frames=98)), root / "backbone")
    recipe = root / "finetune.yaml"
    recipe.write_text(yaml.safe_dump({
        "backbone": str(backbone), "output_dir": str(root / "run"), "tracking": "none",
        "data": {"train": str(root / "shards" / "train"), "val": str(root / "shards" / "val"), "clip_seconds": 1.0,
                 "shuffle_buffer": 8},
        "eval": {"mixtures": 8, "hop_seconds": 1.0},
        "train": {"steps": 2, "batch_size": 4, "warmup_steps": 1, "checkpoint_every": 2, "log_every": 1},
    }))
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: finetune_main([str(recipe)]))
    assert exit_info.value.code == 0
    (root / "file.txt").write_text("not a folder\n")
    (root / "text.wav").write_text("<html>not audio</html>\n" * 20)
    (root / "empty").mkdir()
    truncated = root / "truncated" / "train"
    truncated.mkdir(parents=True)
    whole = (root / "shards" / "train" / "shard-000000.tar").read_bytes()
    (truncated / "shard-000000.tar").write_bytes(whole[: len(whole) // 2])
    return {"root": root, "shards": root / "shards", "unlabeled": root / "unlabeled", "backbone": backbone,
            "recipe": recipe, "run": root / "run", "model": root / "run" / "model", "file": root / "file.txt",
            "text": root / "text.wav", "empty": root / "empty", "truncated": truncated}


def resolve(zoo: dict[str, Path], argv: list[str]) -> list[str]:
    """`{name}` placeholders in argv become the zoo's paths."""
    return [a.format(**{k: str(v) for k, v in zoo.items()}) for a in argv]


SHARDS = {
    "verify a missing folder": (["verify", "{root}/nowhere"], "manifest.json: not found"),
    "verify a file": (["verify", "{file}"], "manifest.json: not found"),
    "stats --plot under a file": (["stats", "{shards}", "--plot", "{file}/x.png"], "file.txt is a file, not a folder"),
    "pack from a file": (["pack", "irmas-train", "{file}", "{root}/out"], "file.txt"),
    "pack into a file": (["pack", "folder", "{root}/plain", "{file}"], "file.txt"),
    "pack zero seconds": (["pack", "folder", "{root}/plain", "{root}/out", "--segment-seconds", "0"],
                          "argument --segment-seconds: 0 must be above 0.0"),
    "pack negative workers": (["pack", "folder", "{root}/plain", "{root}/out", "--workers", "-2"],
                              "argument --workers: -2 must be at least 1"),
    "synth negative count": (["synth", "{root}/synth", "--train-per-class", "-1"],
                             "argument --train-per-class: -1 must be at least 0"),
    "synth zero workers": (["synth", "{root}/synth", "--workers", "0"], "argument --workers: 0 must be at least 1"),
    "synth a missing font": (["synth", "{root}/synth", "--soundfont", "{root}/none.sf2"], "none.sf2"),
    "synth into a file": (["synth", "{file}", "--train-per-class", "1", "--test-files", "0", "--unlabeled", "0"],
                          "file.txt"),
}


@pytest.mark.parametrize("case", SHARDS)
def test_shards_commands(zoo, capsys, case):
    argv, message = SHARDS[case]
    before = fingerprint(zoo["shards"])
    fails(capsys, shards_main, resolve(zoo, argv), names=(message,))
    assert fingerprint(zoo["shards"]) == before
    assert not (zoo["root"] / "out").exists() or not any((zoo["root"] / "out").iterdir())


PRETRAIN = {
    "a missing recipe": (["{root}/none.yaml"], "none.yaml: recipe not found"),
    "output_dir is a file": (["{recipe}", "output_dir={file}"], "is a file, not a folder"),
    "embed into a file's folder": (["embed", "{backbone}", "{text}", "--out", "{file}/x.npz"], "is a file, not a folder"),
    "embed --out a folder": (["embed", "{backbone}", "{text}", "--out", "{empty}.npz/"], ".npz"),
    "embed zero batch": (["embed", "{backbone}", "{text}", "--out", "{root}/e.npz", "--batch-size", "0"],
                         "argument --batch-size: 0 must be at least 1"),
    "embed negative hop": (["embed", "{backbone}", "{text}", "--out", "{root}/e.npz", "--hop-seconds", "-1"],
                           "argument --hop-seconds: -1 must be above 0.0"),
    "embed a missing input": (["embed", "{backbone}", "{root}/none.wav", "--out", "{root}/e.npz"], "none.wav"),
    "embed an empty folder": (["embed", "{backbone}", "{empty}", "--out", "{root}/e.npz"], "no audio files"),
    "embed a truncated shard": (["embed", "{backbone}", "{truncated}", "--out", "{root}/e.npz"],
                                "shard-000000.tar: unreadable shard"),
    "embed a missing backbone": (["embed", "{root}/nothing/here", "{text}", "--out", "{root}/e.npz"], "nothing/here"),
    "publish a missing folder": (["publish", "{root}/none", "--repo-id", "a/b", "--dry-run"], "none"),
    "export a missing checkpoint": (["export", "{root}/none"], "none/model.safetensors: missing"),
    "export a run folder": (["export", "{run}"], "pass one of its checkpoints, e.g. {run}/checkpoints/step-000002"),
    "export a fine-tuning checkpoint": (["export", "{run}/checkpoints/step-000002"],
                                        "run/backbone/config.json: missing; export needs the run folder's backbone/"),
}


@pytest.mark.parametrize("case", PRETRAIN)
def test_pretrain_commands(zoo, capsys, case):
    argv, message = PRETRAIN[case]
    if case == "output_dir is a file":  # a pretraining recipe pointed at the zoo's shards
        recipe = zoo["root"] / "pretrain.yaml"
        recipe.write_text(yaml.safe_dump({"data": {"train": [str(zoo["shards"] / "train")], "clip_seconds": 1.0},
                                          "model": {"size": "cpu-2"}, "train": {"steps": 1, "batch_size": 2}}))
        argv = [str(recipe), *argv[1:]]
    before = fingerprint(zoo["run"])
    fails(capsys, pretrain_main, resolve(zoo, argv), names=tuple(resolve(zoo, [message])))
    assert fingerprint(zoo["run"]) == before
    assert not (zoo["root"] / "e.npz").exists()


def test_a_finished_run_is_never_overwritten(zoo, capsys):
    before = fingerprint(zoo["run"])
    line = fails(capsys, finetune_main, [zoo["recipe"]], names=(zoo["run"],))
    assert "already holds a finished run (step 2 of 2)" in line and "resume=auto" in line
    recipe = zoo["root"] / "pretrain-into-run.yaml"
    recipe.write_text(yaml.safe_dump({"data": {"train": [str(zoo["shards"] / "train")], "clip_seconds": 1.0},
                                      "model": {"size": "cpu-2"}, "output_dir": str(zoo["run"])}))
    fails(capsys, pretrain_main, [recipe], names=(zoo["run"], "already holds a finished run"))
    assert fingerprint(zoo["run"]) == before
    # resume=auto on a finished run trains nothing and keeps the best model it exported
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: finetune_main([str(zoo["recipe"]), "resume=auto"]))
    assert exit_info.value.code == 0
    assert json.loads((zoo["model"] / "finetune.json").read_text())["validation"]["step"] == 2


FINETUNE = {
    "val that does not exist": (["{recipe}", "output_dir={root}/fresh", "data.val={root}/none"], "none"),
    "val without labels": (["{recipe}", "output_dir={root}/fresh", "data.val={unlabeled}/train"],
                           "carry no instrument labels"),
    "train shards truncated": (["{recipe}", "output_dir={root}/fresh", "data.train={truncated}"],
                               "shard-000000.tar: unreadable shard"),
    "evaluate --out a file": (["evaluate", "{model}", "{shards}/val", "--out", "{file}"], "is a file, not a folder"),
    "evaluate a missing model": (["evaluate", "{root}/none", "{shards}/val"], "none"),
    "predict zero batch": (["predict", "{model}", "{text}", "--batch-size", "0"], "--batch-size: 0 must be at least 1"),
    "predict an empty folder": (["predict", "{model}", "{empty}"], "no audio files"),
    "predict text as audio": (["predict", "{model}", "{text}"], "1 of 1 files could not be read"),
    "yardsticks --out a folder": (["yardsticks", "{shards}/train", "{shards}/val", "{shards}/val", "--out", "{empty}"],
                                  "is a folder"),
    "a recipe that is a folder": (["{empty}"], "recipe not found; pass a YAML file such as recipes/finetune/"),
}


@pytest.mark.parametrize("case", FINETUNE)
def test_finetune_commands(zoo, capsys, case):
    argv, message = FINETUNE[case]
    before = fingerprint(zoo["run"])
    code = 1 if case == "predict text as audio" else 2
    fails(capsys, finetune_main, resolve(zoo, argv), names=(message,), code=code)
    assert fingerprint(zoo["run"]) == before
    if case.startswith("val"):  # refused before the first step: no checkpoint, no model
        assert not (zoo["root"] / "fresh" / "checkpoints").exists() and not (zoo["root"] / "fresh" / "model").exists()


def test_predict_expands_folders_like_embed(zoo, capsys):
    folder = zoo["root"] / "collection"
    (folder / "b").mkdir(parents=True)
    for name in ("b/two.flac", "one.wav"):
        sf.write(folder / name, np.random.default_rng(0).uniform(-0.1, 0.1, 24000).astype(np.float32), 16000)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: finetune_main(["predict", str(zoo["model"]), str(folder)]))
    assert exit_info.value.code == 0
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [a["file"] for a in answers] == [str(folder / "b" / "two.flac"), str(folder / "one.wav")]


@pytest.mark.parametrize("main, argv", [
    (shards_main, ["pack"]), (shards_main, []), (pretrain_main, ["embed"]), (pretrain_main, ["publish"]),
    (pretrain_main, ["export"]),
    (pretrain_main, ["RECIPE.yaml"]), (finetune_main, ["RECIPE.yaml"]), (finetune_main, ["evaluate"]),
    (finetune_main, ["predict"]), (finetune_main, ["yardsticks"]), (finetune_main, ["serve"]),
    (finetune_main, ["plot-embeddings"]),
])
def test_every_command_answers_help_and_version(main, argv, capsys):
    for flag in ("--help", "--version"):
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, flag])
        assert exit_info.value.code == 0, flag
        out = capsys.readouterr().out
        assert ("usage:" in out) if flag == "--help" else ("(timbre " in out), (argv, flag, out)


def test_predict_a_collection_to_jsonl_resumes_and_accounts_for_every_input(zoo, capsys):
    folder = zoo["root"] / "library"
    (folder / "live").mkdir(parents=True)
    for name in ("a.wav", "live/b.flac", "c.wav"):
        sf.write(folder / name, np.random.default_rng(1).uniform(-0.1, 0.1, 20000).astype(np.float32), 16000)
    (folder / "live" / "broken.wav").write_text("<html>not audio</html>\n" * 20)
    out = zoo["root"] / "tags" / "predictions.jsonl"

    def run() -> tuple[int, list[dict], str]:
        with pytest.raises(SystemExit) as exit_info:
            run_cli(lambda: finetune_main(["predict", str(zoo["model"]), str(folder), "--out", str(out)]))
        return exit_info.value.code, [json.loads(line) for line in out.read_text().splitlines()], capsys.readouterr().err

    code, lines, err = run()
    assert code == 1 and len(lines) == 4
    assert {Path(line["file"]).name for line in lines if "error" in line} == {"broken.wav"}
    assert "4 inputs = 3 answered + 1 unreadable + 0 answered by an earlier run" in err
    first = out.read_bytes()
    code, lines, err = run()  # nothing left to do
    assert code == 0 and out.read_bytes() == first and "4 answered by an earlier run" in err
    out.write_bytes(first.rsplit(b"\n", 2)[0] + b"\n" + b'{"file": "' + str(folder).encode())  # killed mid-line
    code, lines, err = run()
    assert [line["file"] for line in lines] == [json.loads(line)["file"] for line in first.splitlines()]
    assert "0 answered + 1 unreadable + 3 answered by an earlier run" in err  # the cut line was broken.wav's


def test_predict_reads_shards_and_names_each_sample(zoo, capsys):
    out = zoo["root"] / "tags" / "val.jsonl"
    spec = str(zoo["shards"] / "val")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: finetune_main(["predict", str(zoo["model"]), spec, "--out", str(out)]))
    assert exit_info.value.code == 0
    names = [json.loads(line)["file"] for line in out.read_text().splitlines()]
    manifest = json.loads((zoo["shards"] / "manifest.json").read_text())
    assert len(names) == manifest["splits"]["val"]["samples"] and all(name.startswith(f"{spec}#") for name in names)
    assert f"{len(names)} inputs = {len(names)} answered + 0 unreadable" in capsys.readouterr().err
