"""`python -m pretrain embed`: windowed clip embeddings of audio files and shards, keyed by file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from core.errors import UserError
from pretrain.backbone import Backbone, BackboneConfig
from pretrain.embed import embed, main
from pretrain.encoder import window_starts
from pretrain.frontend import LogMel
from pretrain.hub import save_pretrained
from shards.audio import decode_flac, encode_flac

CLIP = 47920  # samples in 298 frames: the backbone's clip


def mono(tone, seconds: float, f0: float, rate: int = 16000) -> np.ndarray:
    return tone(seconds=seconds, sample_rate=rate, channels=1, frequency=f0)[:, 0]


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    torch.manual_seed(0)
    return Backbone(BackboneConfig.from_size("tiny", num_layers=2, max_frames=298)).eval()


@pytest.fixture(scope="module")
def audio(tone, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("audio")
    sf.write(folder / "long.wav", mono(tone, 7.3, 220.0), 16000)
    sf.write(folder / "short.flac", mono(tone, 1.0, 440.0), 16000)
    sf.write(folder / "stereo 44k.wav", np.stack([mono(tone, 4.0, 330.0, 44100), mono(tone, 4.0, 110.0, 44100)], axis=1),
             44100)
    return folder


def decoded(path: Path) -> np.ndarray:
    """The file as stored (16-bit files are quantised), mono at its own rate."""
    return sf.read(path, dtype="float32", always_2d=True)[0].mean(axis=1)


def reference(backbone: Backbone, waveform: np.ndarray, starts: list[int], length: int) -> torch.Tensor:
    pieces = torch.stack([torch.from_numpy(waveform[start: start + length]) for start in starts])
    with torch.no_grad():
        return backbone(LogMel()(pieces))


def test_window_starts_cover_the_whole_signal() -> None:
    assert window_starts(100, 300, 300) == [0]
    assert window_starts(300, 300, 100) == [0]
    assert window_starts(1000, 300, 300) == [0, 300, 600, 700]
    assert window_starts(900, 300, 300) == [0, 300, 600]


def test_embeddings_are_window_means_keyed_by_file(backbone: Backbone, audio: Path) -> None:
    arrays, skipped = embed(backbone, [str(audio)], batch_size=2, tokens=True)
    assert skipped == []
    keys = [str(audio / "long.wav"), str(audio / "short.flac"), str(audio / "stereo 44k.wav")]
    assert arrays["keys"].tolist() == keys
    assert arrays["windows"].tolist() == [3, 1, 2] and arrays["embeddings"].shape == (3, 192)
    long = decoded(audio / "long.wav")
    expected = reference(backbone, long, [0, CLIP, long.size - CLIP], CLIP)
    np.testing.assert_allclose(arrays["embeddings"][0], expected.embedding.mean(0).numpy(), atol=1e-5)
    padded = np.pad(decoded(audio / "short.flac"), (0, CLIP - 16000))  # shorter than a window: padded to one, as in training
    short = reference(backbone, padded, [0], CLIP)
    np.testing.assert_allclose(arrays["embeddings"][1], short.embedding[0].numpy(), atol=1e-5)
    offsets, grids = arrays["token_offsets"], arrays["token_grids"]
    assert grids.tolist() == [[8, 18], [8, 18], [8, 18]] and offsets.tolist() == [0, 144, 288, 432]
    assert arrays["tokens"].shape == (432, 192)
    np.testing.assert_allclose(arrays["tokens"][144:288], short.tokens[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(arrays["tokens"][:144], expected.tokens.mean(0).numpy(), atol=1e-5)


def test_overlapping_windows(backbone: Backbone, audio: Path) -> None:
    arrays, _ = embed(backbone, [str(audio / "long.wav")], window_seconds=2.0, hop_seconds=1.0)
    assert arrays["windows"].tolist() == [7]  # starts 0..5 s, then one aligned to the end
    long = decoded(audio / "long.wav")
    expected = reference(backbone, long, [*range(0, 5 * 16000 + 1, 16000), long.size - 32000], 32000)
    np.testing.assert_allclose(arrays["embeddings"][0], expected.embedding.mean(0).numpy(), atol=1e-5)
    with pytest.raises(UserError, match="--window-seconds"):
        embed(backbone, [str(audio)], window_seconds=5.0)


def test_command_line_on_audio_and_shards(backbone: Backbone, audio: Path, tone, write_shard, tmp_path: Path) -> None:
    folder = save_pretrained(backbone, tmp_path / "backbone")
    shards = write_shard(tmp_path / "shards" / "test", [
        dict(key=f"song-{index}_0000", song=f"song-{index}", audio=mono(tone, 4.0, f0), sample_rate=16000)
        for index, f0 in enumerate((261.6, 392.0))], source="folder")
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    out = tmp_path / "out" / "embeddings.npz"
    result = subprocess.run([sys.executable, "-m", "pretrain", "embed", str(folder), str(audio / "short.flac"),
                             str(shards), str(bad), "--out", str(out)], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 1, result.stderr  # something was skipped, and said so
    assert f"skipped {bad}:" in result.stderr and "embedded 3 clips (5 windows), skipped 1" in result.stderr
    arrays = np.load(out)
    assert arrays["keys"].tolist() == [str(audio / "short.flac"), "song-0_0000", "song-1_0000"]
    assert arrays["windows"].tolist() == [1, 2, 2] and "tokens" not in arrays
    stored, _ = decode_flac(encode_flac(mono(tone, 4.0, 261.6)[:, None], 16000))
    expected = reference(backbone, stored[:, 0], [0, 64000 - CLIP], CLIP).embedding.mean(0)
    np.testing.assert_allclose(arrays["embeddings"][1], expected.numpy(), atol=1e-5)


def test_user_errors(backbone: Backbone, audio: Path, tmp_path: Path) -> None:
    folder = save_pretrained(backbone, tmp_path / "backbone")
    with pytest.raises(UserError, match="must be a .npz"):
        main([str(folder), str(audio), "--out", str(tmp_path / "e.txt")])
    with pytest.raises(UserError, match="no such file"):
        main([str(folder), str(tmp_path / "missing.wav"), "--out", str(tmp_path / "e.npz")])
    with pytest.raises(UserError, match="given twice"):
        embed(backbone, [str(audio / "short.flac"), str(audio / "short.flac")])
