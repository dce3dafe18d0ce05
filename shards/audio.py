"""Decode, check, resample and mix audio; encode FLAC.

Decoding is soundfile (libsndfile: wav, flac, ogg, mp3, aiff, ...), resampling is
torchaudio. Every way a file can be unusable becomes a `BadAudio` with a one-line reason,
so the packer can list it instead of crashing or silently writing garbage.
"""

from __future__ import annotations

import io
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.transforms as T
from einops import rearrange

SILENCE_PEAK = 1e-4  # -80 dBFS: below one 16-bit step after encoding, i.e. nothing would be stored
_MAGIC = (b"RIFF", b"RIFX", b"RF64", b"FORM", b"fLaC", b"OggS", b"ID3", b".snd", b"caff", b"riff")
_DECLARED_LONGER = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)


class BadAudio(Exception):
    """A file that cannot be packed; the message is the one-line reason listed in the manifest."""


def read_segments(
    path: str | os.PathLike, *, segment_seconds: float | None = None
) -> Iterator[tuple[float, np.ndarray, int]]:
    """Yield (start seconds, (frames, channels) float32, sample rate) for the whole file or each segment.

    Segments are read one at a time so a whole song never sits in memory; a trailing
    remainder shorter than half a segment is dropped unless it is the only one.
    Raises BadAudio for empty, unreadable, corrupt, truncated, non-audio, zero-length and NaN/inf input.
    """
    path = Path(path)
    with _open(path) as handle:
        total, rate = handle.frames, handle.samplerate
        if total <= 0:
            raise BadAudio("no audio samples (zero-length file)")
        step = total if segment_seconds is None else max(1, int(round(segment_seconds * rate)))
        start = 0
        while start < total:
            length = min(step, total - start)
            if start > 0 and length < step / 2:
                break
            try:
                with _decoder_chatter_hidden():
                    block = handle.read(length, dtype="float32", always_2d=True)
            except (sf.LibsndfileError, RuntimeError) as error:
                raise BadAudio(f"corrupt audio at {start / rate:.2f} s ({_libsndfile_message(error)})") from None
            if block.shape[0] < length:
                raise BadAudio(f"truncated: {start + block.shape[0]} of {total} frames readable")
            if not np.isfinite(block).all():
                raise BadAudio(f"NaN or inf samples at {start / rate:.2f} s; the file is broken")
            yield start / rate, block, rate
            start += length


@contextmanager
def _open(path: Path) -> Iterator[sf.SoundFile]:
    """Open with soundfile, turning every failure into a BadAudio that says what kind of failure it is."""
    try:
        size = os.path.getsize(path)
    except OSError as error:
        raise BadAudio(f"unreadable: {error.strerror or error}") from None
    if size == 0:
        raise BadAudio("empty file (0 bytes)")
    try:
        with open(path, "rb") as raw:
            head = raw.read(12)
        with _decoder_chatter_hidden():
            handle = sf.SoundFile(path)
    except OSError as error:
        raise BadAudio(f"unreadable: {error.strerror or error}") from None
    except (sf.LibsndfileError, RuntimeError) as error:
        message = _libsndfile_message(error)
        if "does not exist or is not a regular file" in message:  # libsndfile's words when no decoder takes the bytes
            message = "no decoder recognises its contents"
        if _looks_like_audio(head):
            raise BadAudio(f"corrupt audio: {message}") from None
        raise BadAudio(f"not decodable audio ({message})") from None
    with handle:
        for declared, actual in _DECLARED_LONGER.findall(handle.extra_info):
            if int(declared) > int(actual):
                raise BadAudio(f"truncated: the header declares {declared} bytes of audio, the file holds {actual}")
        yield handle


@contextmanager
def _decoder_chatter_hidden() -> Iterator[None]:
    """libsndfile's MPEG decoder prints "Note: Illegal Audio-MPEG-Header ..." lines on the process's C stderr; the
    failure reaches the user as one BadAudio line instead. Anything else written meanwhile is passed on."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            other = [line for line in sink.read().decode(errors="replace").splitlines()
                     if not line.startswith(("Note: ", "Warning: "))]
            if other:
                print("\n".join(other), file=sys.stderr)


def _looks_like_audio(head: bytes) -> bool:
    return head.startswith(_MAGIC) or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0)


def _libsndfile_message(error: Exception) -> str:
    text = getattr(error, "error_string", None) or str(error)
    return re.sub(r"^Error opening .*?: ", "", text).strip().rstrip(".")


def is_silent(block: np.ndarray) -> bool:
    """True when nothing above -80 dBFS would be stored."""
    return block.size == 0 or float(np.abs(block).max()) < SILENCE_PEAK


def convert(block: np.ndarray, rate: int, *, sample_rate: int, channels: int) -> np.ndarray:
    """(frames, C) at `rate` -> (frames', channels) float32 at `sample_rate`, clipped to [-1, 1].

    Channel rule: same count is kept; mono targets average all channels; a mono source is
    duplicated; any other layout (e.g. 5.1 -> stereo) is averaged to mono, then duplicated.
    """
    have = block.shape[1]
    if have != channels:
        mono = block.mean(axis=1, keepdims=True)
        block = mono if channels == 1 else np.repeat(mono, channels, axis=1)
    if rate != sample_rate:
        wave = torch.from_numpy(np.ascontiguousarray(rearrange(block, "t c -> c t")))
        with torch.inference_mode():
            wave = _resampler(rate, sample_rate)(wave)
        block = rearrange(wave.numpy(), "c t -> t c")
    return np.clip(block, -1.0, 1.0).astype(np.float32, copy=False)


def to_mono(block: np.ndarray, rate: int, sample_rate: int) -> torch.Tensor:
    """(frames, channels) float -> mono float32 (samples,) tensor at `sample_rate`, by `convert`'s rules."""
    return torch.from_numpy(np.ascontiguousarray(convert(block, rate, sample_rate=sample_rate, channels=1)[:, 0]))


@lru_cache(maxsize=16)
def _resampler(rate: int, sample_rate: int) -> T.Resample:
    """A resampler per rate pair: building the windowed-sinc kernel costs more than applying it to a clip."""
    return T.Resample(rate, sample_rate)


def encode_flac(block: np.ndarray, sample_rate: int) -> bytes:
    """16-bit FLAC bytes of a (frames, channels) float block."""
    buffer = io.BytesIO()
    sf.write(buffer, block, sample_rate, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def decode_flac(data: bytes) -> tuple[np.ndarray, int]:
    """(frames, channels) float32 and the sample rate of FLAC bytes."""
    block, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return block, rate
