"""Packing and loading throughput, each against its peer in the same run. Not a test.

Prints one JSON object:
  pack:   clips/s of `shards.pack.pack` with 1 and 2 workers on the same input (and the ratio), and the peak
          resident memory of the whole pack process tree (main process, forkserver, workers; polled with
          psutil) for a small input and one 10x larger (and the ratio: bounded memory keeps it near 1).
  loader: clips/s from the packed shards to collated batches with `shards.loader.train_batches`, against a
          per-file torch `Dataset` that reads each original 44.1 kHz stereo wav with soundfile and resamples
          it per item (the usual baseline), with the same batch size and number of DataLoader workers; without
          workers also the epochs after the first with a `SampleCache` (shards kept decoded in memory, the same
          batches), against the same epochs read and decoded from the shards.

Inputs are IRMAS-layout 3 s, 44.1 kHz stereo wavs written with numpy + soundfile to a temporary folder.
Each pack runs in a fresh subprocess so that memory and timing are its own; times exclude interpreter start.

    python bench/shard_io.py [--small 128] [--shard-size 32] [--batch 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import soundfile
import torch
import torchaudio

from shards import vocab
from shards.loader import SampleCache, train_batches

SECONDS, RATE, CHANNELS = 3.0, 44100, 2

CHILD = """
import json, sys, time
from shards.pack import PackOptions, pack
source, outdir, workers, shard_size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
start = time.perf_counter()
manifest = pack(source, outdir, options=PackOptions(source="irmas-train", shard_size=shard_size), workers=workers,
                progress=False, print_fn=lambda *args, **kwargs: None)
print(json.dumps({"seconds": time.perf_counter() - start, "packed": manifest["packed"]}))
"""


def write_inputs(root: Path, clips: int) -> Path:
    """`clips` IRMAS-training-layout wavs: a harmonic tone per class plus noise, tagged names, 3 s stereo."""
    base = root / "IRMAS-TrainingData"
    rng = np.random.default_rng(0)
    t = np.arange(round(SECONDS * RATE)) / RATE
    for n in range(clips):
        code, genre = vocab.INSTRUMENTS[n % vocab.NUM_INSTRUMENTS], vocab.GENRES[n % vocab.NUM_GENRES]
        pitch = 110.0 * (1 + n % 11) * (1 + 0.01 * (n // 11))
        wave = sum(np.sin(2 * np.pi * pitch * (h + 1) * t) / (h + 1) for h in range(4))
        audio = np.stack([0.2 * wave + 0.01 * rng.standard_normal(t.size) for _ in range(CHANNELS)], axis=1)
        path = base / code / f"[{code}][{genre}]{n:04d}__1.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(path, audio.astype(np.float32), RATE, subtype="PCM_16")
    return base


def run_pack(source: Path, outdir: Path, *, workers: int, shard_size: int) -> dict:
    """Pack in a fresh interpreter; returns its pack seconds, clips/s and the peak RSS (MiB) of its process tree."""
    process = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(source), str(outdir), str(workers), str(shard_size)],
        stdout=subprocess.PIPE,
        text=True,
    )
    watched, peak, cpu = psutil.Process(process.pid), 0, {}
    while process.poll() is None:
        try:
            tree = [watched, *watched.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree))
            cpu |= {p.pid: sum(p.cpu_times()[:2]) for p in tree}  # last seen user + system time of each
        except psutil.Error:  # a process ended between listing and asking
            pass
        time.sleep(0.02)
    out, _ = process.communicate()
    if process.returncode:
        raise SystemExit(f"pack failed with status {process.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    return {
        "clips": result["packed"],
        "seconds": round(result["seconds"], 3),
        "clips_per_s": round(result["packed"] / result["seconds"], 1),
        "peak_rss_mib": round(peak / 2**20, 1),
        "tree_cpu_seconds": round(sum(cpu.values()), 2),  # with interpreter and worker start-up
    }


class PerFileClips(torch.utils.data.Dataset):
    """The baseline: each item reads its wav, mixes to mono, resamples and crops, every time it is asked for."""

    def __init__(self, *, files: list[Path], sample_rate: int, seconds: float) -> None:
        self.files, self.sample_rate, self.length = files, sample_rate, round(seconds * sample_rate)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        audio, rate = soundfile.read(self.files[index], dtype="float32", always_2d=True)
        mono = torchaudio.functional.resample(torch.from_numpy(audio.mean(axis=1)), rate, self.sample_rate)
        start = random.randint(0, max(0, len(mono) - self.length))
        clip = torch.nn.functional.pad(mono[start : start + self.length], (0, max(0, self.length - len(mono))))
        code = self.files[index].parent.name
        return {"audio": clip, "targets": torch.from_numpy(vocab.multi_hot([code]))}


def clips_per_s(batches, clips: int) -> tuple[float, float]:
    """(clips per wall second, clips per CPU second of this process): the second is less hurt by other load."""
    wall, cpu, seen = time.perf_counter(), time.process_time(), 0
    for batch in batches:
        seen += len(batch["audio"])
    assert seen >= clips, (seen, clips)
    return seen / (time.perf_counter() - wall), seen / (time.process_time() - cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=128, help="clips in the small input (the large one has 10x)")
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers for both loaders")
    parser.add_argument("--repeats", type=int, default=3, help="each figure is the best of this many runs")
    args = parser.parse_args()
    torch.set_num_threads(1)  # like a DataLoader worker; per-clip ops gain nothing from threads on a busy machine
    load = [round(x, 2) for x in os.getloadavg()]  # other processes on the machine skew wall-clock ratios

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        small = write_inputs(root / "small", args.small)
        large = write_inputs(root / "large", 10 * args.small)

        # Interleave the configurations so that load from other processes hits all of them alike.
        configs = {"small_1_worker": (small, 1), "large_1_worker": (large, 1), "large_2_workers": (large, 2)}
        runs: dict[str, list[dict]] = {name: [] for name in configs}
        for repeat in range(args.repeats):
            for name, (source, workers) in configs.items():
                out = root / f"{name}-{repeat}"
                runs[name].append(run_pack(source, out, workers=workers, shard_size=args.shard_size))
        pack = {  # fastest run of each, with the highest peak memory seen in any of its runs
            name: max(done, key=lambda run: run["clips_per_s"]) | {"peak_rss_mib": max(r["peak_rss_mib"] for r in done)}
            for name, done in runs.items()
        }
        one, two, small_one = pack["large_1_worker"], pack["large_2_workers"], pack["small_1_worker"]
        pack["speedup_2_vs_1_workers"] = round(two["clips_per_s"] / one["clips_per_s"], 2)
        pack["peak_rss_large_vs_small"] = round(one["peak_rss_mib"] / small_one["peak_rss_mib"], 2)

        shards = root / "large_1_worker-0" / "train"
        files = sorted(large.rglob("*.wav"))
        batches = math.ceil(len(files) / args.batch)
        shard_rates, file_rates = [], []
        for _ in range(args.repeats):
            stream = train_batches(shards, batch_size=args.batch, batches_per_epoch=batches, num_workers=args.workers)
            shard_rates.append(clips_per_s(stream, len(files)))
            per_file = PerFileClips(files=files, sample_rate=16000, seconds=SECONDS)
            loader = torch.utils.data.DataLoader(per_file, batch_size=args.batch, shuffle=True, num_workers=args.workers)
            file_rates.append(clips_per_s(loader, len(files)))
        shard_wall, shard_cpu = (max(rates) for rates in zip(*shard_rates))
        file_wall, file_cpu = (max(rates) for rates in zip(*file_rates))
        loader = {
            "clips": len(files),
            "batch": args.batch,
            "num_workers": args.workers,
            "shards_clips_per_s": round(shard_wall, 1),
            "per_file_clips_per_s": round(file_wall, 1),
            "speedup": round(shard_wall / file_wall, 2),
        }
        if args.workers == 0:  # all the work happens in this process, so its CPU time measures it
            loader |= {
                "shards_clips_per_cpu_s": round(shard_cpu, 1),
                "per_file_clips_per_cpu_s": round(file_cpu, 1),
                "speedup_cpu_time": round(shard_cpu / file_cpu, 2),
            }
            cache, read_rates, cached_rates = SampleCache(4.0), [], []
            list(train_batches(shards, batch_size=args.batch, batches_per_epoch=batches, cache=cache))  # fills it
            for epoch in range(1, args.repeats + 1):  # interleaved: the same later epochs, read or from the cache
                read_rates.append(clips_per_s(train_batches(shards, batch_size=args.batch, epoch=epoch,
                                                            batches_per_epoch=batches), len(files)))
                cached_rates.append(clips_per_s(train_batches(shards, batch_size=args.batch, epoch=epoch,
                                                              batches_per_epoch=batches, cache=cache), len(files)))
            read_wall, cached_wall = max(r[0] for r in read_rates), max(r[0] for r in cached_rates)
            loader |= {
                "later_epochs_read_clips_per_s": round(read_wall, 1),
                "later_epochs_cached_clips_per_s": round(cached_wall, 1),
                "cache_speedup": round(cached_wall / read_wall, 2),
                "cache_mib": round(cache.bytes / 2**20, 1),
            }

    print(json.dumps({
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "load_average_at_start": load, "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
        "input": {"small_clips": args.small, "large_clips": 10 * args.small, "seconds": SECONDS,
                  "sample_rate": RATE, "channels": CHANNELS, "shard_size": args.shard_size},
        "pack": pack,
        "loader": loader,
        "targets": {"speedup_2_vs_1_workers": ">= 1.7", "loader_speedup": ">= 5", "peak_rss_large_vs_small": "~1"},
    }, indent=1))


if __name__ == "__main__":
    main()
