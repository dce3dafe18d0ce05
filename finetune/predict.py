"""`python -m finetune predict MODEL FILE_OR_FOLDER_OR_SHARDS... [--timeline] [--out FILE.jsonl]`.

One JSON object per file, on stdout or, with --out, appended to a JSON-lines file that a rerun resumes. Any length,
sample rate, channel count and format that soundfile reads; folders are searched recursively. A file that cannot be
read gets an object with an `error` (one line, from `shards.audio`) and the others still get answers; the exit
status is 1 when any failed.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import sys
from collections.abc import Iterable, Iterator, Set
from pathlib import Path

import numpy as np
import torch

from core.errors import ArgumentParser, output_file
from core.progress import progress_bar
from finetune.folder import FinetunedModel, load_model
from finetune.inference import FileResult, add_inference_options, infer
from shards.audio import BadAudio
from shards.inputs import expand, read_mono, shard_examples
from shards.loader import sample_count
from shards.vocab import INSTRUMENT_NAMES


def describe(model: FinetunedModel, name: str, result: FileResult, *, aggregate: str, timeline: bool) -> dict:
    """The JSON answer for one file: instruments above threshold (most probable first), all probabilities."""
    labels, thresholds = model.info.labels, np.array(model.info.thresholds)
    probabilities = result.aggregate(aggregate)

    def present(p: np.ndarray) -> list[str]:
        return [labels[i] for i in np.argsort(-p, kind="stable") if p[i] >= thresholds[i]]

    answer = {
        "file": name,
        "instruments": present(probabilities),
        "names": [INSTRUMENT_NAMES[code] for code in present(probabilities)],
        "probabilities": {code: round(float(p), 6) for code, p in zip(labels, probabilities)},
        "duration": round(result.duration, 3),
        "windows": len(result.starts),
    }
    if timeline:
        clip = model.info.clip_seconds
        answer["timeline"] = [
            {"start": round(start, 3), "end": round(min(start + clip, result.duration), 3),
             "instruments": present(p), "probabilities": {code: round(float(v), 6) for code, v in zip(labels, p)}}
            for start, p in zip(result.starts, result.probabilities)
        ]
    return answer


def predict(model: FinetunedModel, files: Iterable[str | tuple[str, torch.Tensor]], *, timeline: bool = False,
            aggregate: str | None = None, hop_seconds: float | None = None, batch_size: int = 32) -> Iterator[dict]:
    """Answers in input order, as soon as each is ready; unreadable files get {"file", "error"}.

    An entry is a file name, or (name, mono audio at the model's rate) for audio decoded already (shard samples).
    """
    aggregate = aggregate or model.info.aggregate
    errors: dict[int, str] = {}
    names: list[str] = []

    def readable():
        for index, entry in enumerate(files):
            name, audio = (entry, None) if isinstance(entry, str) else entry
            names.append(name)
            try:
                yield index, audio if audio is not None else read_mono(name, model.info.sample_rate)
            except BadAudio as error:
                errors[index] = str(error)
            except OSError as error:
                errors[index] = f"unreadable: {error}"

    done = 0  # infer yields in input order, so every file before `index` that it skipped has failed
    for index, result in infer(model, readable(), hop_seconds=hop_seconds, batch_size=batch_size):
        for failed in range(done, index):
            yield {"file": names[failed], "error": errors[failed]}
        yield describe(model, names[index], result, aggregate=aggregate, timeline=timeline)
        done = index + 1
    for failed in range(done, len(names)):
        yield {"file": names[failed], "error": errors[failed]}


def shard_entries(spec: str, sample_rate: int, skip: Set[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(SPEC#KEY, audio) of every sample in the shards of `spec` not named in `skip`."""
    for example in shard_examples(spec, sample_rate):
        name = f"{spec}#{example.key}"
        if name not in skip:
            yield name, example.audio


def input_count(named: list[tuple[str, bool]]) -> int:
    """How many files and shard samples `expand`ed inputs hold."""
    return sum(sample_count(name) if shards else 1 for name, shards in named)


def entries(named: list[tuple[str, bool]], sample_rate: int, skip: Set[str] = frozenset()
            ) -> Iterator[str | tuple[str, torch.Tensor]]:
    """What `predict` takes for `expand`ed inputs: each file name, and (SPEC#KEY, audio) of each shard sample; those
    named in `skip` left out."""
    return itertools.chain.from_iterable(
        shard_entries(name, sample_rate, skip) if shards else [name] * (name not in skip) for name, shards in named)


def main(argv: list[str]) -> int:
    """Name the instruments in audio files of any length: files, folders (recursively) or a whole collection."""
    parser = ArgumentParser(prog="python -m finetune predict", description=main.__doc__)
    parser.add_argument("model", help="model folder (<output_dir>/model of a fine-tuning run)")
    parser.add_argument("files", nargs="+", help="audio files (wav, flac, ogg, mp3, aiff, ...), folders of them, or "
                        "shards (a .tar or a shard folder; answers are named SHARDS#KEY)")
    parser.add_argument("--timeline", action="store_true", help="also give every window's probabilities")
    parser.add_argument("--out", default=None, metavar="FILE.jsonl",
                        help="write the answers here, one JSON line per file, with a progress bar; a rerun skips the "
                        "files already answered in it (default: stdout)")
    add_inference_options(parser)
    args = parser.parse_args(argv)
    named = list(expand(args.files))
    out = output_file(args.out) if args.out else None
    earlier = _answered(out) if out else set()
    inputs = input_count(named)
    model = load_model(args.model, precision=args.precision)
    failed, answered = [], 0
    with open(out, "a") if out else contextlib.nullcontext(sys.stdout) as sink:
        bar = progress_bar(total=inputs - len(earlier), desc="predict", unit="file", enabled=out is not None)
        for answer in predict(model, entries(named, model.info.sample_rate, earlier), timeline=args.timeline,
                              aggregate=args.aggregate, hop_seconds=args.hop_seconds, batch_size=args.batch_size):
            sink.write(json.dumps(answer) + "\n")
            sink.flush()
            bar.update()
            answered += 1
            if "error" in answer:
                failed.append(answer["file"])
        bar.close()
    if out:
        print(f"{out}: {inputs} inputs = {answered - len(failed)} answered + {len(failed)} unreadable + "
              f"{inputs - answered} answered by an earlier run", file=sys.stderr)
    if failed:
        print(f"error: {len(failed)} of {answered} files could not be read: "
              f"{', '.join(Path(name).name for name in failed[:10])}{' ...' if len(failed) > 10 else ''} "
              "(see their \"error\" objects)", file=sys.stderr)
        return 1
    return 0


def _answered(out: Path) -> set[str]:
    """Files already answered in `out`; a last line cut short by an interrupted run is dropped from the file."""
    if not out.is_file():
        return set()
    answered, keep = set(), 0
    with open(out, "rb") as handle:
        for line in handle:
            try:
                answered.add(json.loads(line)["file"])
            except (ValueError, KeyError, TypeError):
                break
            keep += len(line)
    if keep != out.stat().st_size:
        with open(out, "r+b") as handle:
            handle.truncate(keep)
    return answered
