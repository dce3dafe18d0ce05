"""Rendering: clip plans -> audio. Many clips' stems are laid one after another in one MIDI file and rendered by one
FluidSynth process (loading a SoundFont costs more than rendering a clip), then cut apart, coloured, mixed at their
levels and written as 16-bit wav.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import mido
import numpy as np
import soundfile as sf

from core.errors import UserError
from shards.synth.music import Colour, Part
from shards.synth.plans import Clip

SAMPLE_RATE = 44100  # IRMAS's rate, the default; any multiple of 100 Hz keeps stems aligned (below)
FLUIDR3 = Path("/usr/share/sounds/sf2/FluidR3_GM.sf2")
INSTALL_HINT = "install FluidSynth and a General MIDI SoundFont (apt-get install fluidsynth fluid-soundfont-gm, " \
               "or brew install fluid-synth)"
BATCH_SECONDS = 120.0  # stem audio rendered by one FluidSynth process
GAP_SECONDS = 0.25  # silence between two stems in a batch (voices are killed at each stem's end)
TICKS_PER_SECOND = 1000  # MIDI clock of the batch files: 1 tick = 1 ms (tempo 60 bpm, 1000 ticks per beat)
# FluidSynth plays MIDI events at the first 64-sample block after their time, so stems start on multiples of
# 640 ms (= rate / 100 blocks: 441 at 44.1 kHz, 160 at 16 kHz): every stem then sounds the same, sample for sample,
# wherever it is rendered, at any rate that is a multiple of 100 Hz.
ALIGN_TICKS = 640
FLUIDSYNTH_BLOCK = 64  # samples
DRUM_CHANNEL = 9
NOTE_OFF, NOTE_ON, PROGRAM_CHANGE, CONTROL_CHANGE = 0x80, 0x90, 0xC0, 0xB0  # MIDI status bytes (| channel)


def colour(audio: np.ndarray, tone: Colour, sample_rate: int) -> np.ndarray:
    """`audio` (frames, channels) through the EQ `tone`, by FFT (float64), zero-padded to a fast length."""
    n = _fast_length(len(audio) + sample_rate // 10)
    spectrum = np.fft.rfft(audio.astype(np.float64), n=n, axis=0)
    spectrum *= _gain(tone, n, sample_rate)[:, None]
    return np.fft.irfft(spectrum, n=n, axis=0)[: len(audio)]


@lru_cache(maxsize=4)
def _gain(tone: Colour, n: int, sample_rate: int) -> np.ndarray:
    """The EQ's gain at the frequencies of an n-point rfft, made once for all the stems of a clip."""
    return tone.gain(np.fft.rfftfreq(n, 1 / sample_rate))


def _fast_length(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= n (FFT lengths with large prime factors are many times slower)."""
    best, power5 = 2 * n, 1
    while power5 < best:
        power3 = power5
        while power3 < best:
            size = power3 * 2 ** max(0, math.ceil(math.log2(n / power3)))
            best = min(best, size)
            power3 *= 3
        power5 *= 5
    return best


# --- Rendering ---------------------------------------------------------------------------


def aligned(sample_rate: int) -> bool:
    """Whether stems starting every ALIGN_TICKS start on FluidSynth's blocks at `sample_rate` (multiples of 100 Hz)."""
    return sample_rate * ALIGN_TICKS % (TICKS_PER_SECOND * FLUIDSYNTH_BLOCK) == 0


def _ticks(seconds: float) -> int:
    return int(round(seconds * TICKS_PER_SECOND))


def stem_layout(stems: Sequence[tuple[float, list[Part]]]) -> list[int]:
    """Start tick of each (seconds, parts) stem when they are laid one after another, block-aligned, with a gap."""
    starts, tick = [], 0
    for seconds, _ in stems:
        starts.append(tick)
        tick += -(-_ticks(seconds + GAP_SECONDS) // ALIGN_TICKS) * ALIGN_TICKS
    return starts


def write_midi(stems: Sequence[tuple[float, list[Part]]], path: Path) -> list[int]:
    """One type-0 MIDI file playing the stems in turn; returns each stem's start tick (1 tick = 1 ms)."""
    starts = stem_layout(stems)
    # (tick, order, message bytes): setup < note off < note on < kill; messages are made once their time is known
    events: list[tuple[int, int, list[int]]] = []
    for start, (seconds, parts) in zip(starts, stems):
        channels = iter(c for c in range(16) if c != DRUM_CHANNEL)
        for part in parts:
            channel = DRUM_CHANNEL if part.drums else next(channels)
            events += [
                (start, 0, [PROGRAM_CHANGE | channel, part.program]),
                (start, 0, [CONTROL_CHANGE | channel, 7, part.volume]),
                (start, 0, [CONTROL_CHANGE | channel, 10, part.pan]),
            ]
            for note in part.notes:
                on, off = start + _ticks(note.start), start + max(_ticks(note.end), _ticks(note.start) + 1)
                events.append((on, 2, [NOTE_ON | channel, note.pitch, note.velocity]))
                events.append((off, 1, [NOTE_OFF | channel, note.pitch, 0]))
        end = start + _ticks(seconds)
        for channel in range(16):  # silence everything at the stem's end, and reset for the next one
            events.append((end, 3, [CONTROL_CHANGE | channel, 120, 0]))
            events.append((end, 3, [CONTROL_CHANGE | channel, 121, 0]))
    events.sort(key=lambda e: (e[0], e[1]))
    track = mido.MidiTrack([mido.MetaMessage("set_tempo", tempo=1_000_000, time=0)])
    last = 0
    for tick, _, data in events:
        track.append(mido.Message.from_bytes(data, time=tick - last))
        last = tick
    midi = mido.MidiFile(type=0, ticks_per_beat=TICKS_PER_SECOND)
    midi.tracks.append(track)
    midi.save(path)
    return starts


def fluidsynth(midi: Path, wav: Path, soundfont: Path, sample_rate: int) -> None:
    """Render `midi` to float stereo wav; no reverb or chorus (their tails would cross stems)."""
    command = ["fluidsynth", "-ni", "-q", "-R", "0", "-C", "0", "-g", "0.5", "-r", str(sample_rate),
               "-o", "synth.dynamic-sample-loading=1", "-o", "synth.polyphony=512",
               "-T", "wav", "-O", "float", "-F", str(wav), str(soundfont), str(midi)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not wav.exists():
        message = (result.stderr or result.stdout).strip().splitlines()
        raise RuntimeError(f"fluidsynth failed on {midi.name} (exit {result.returncode}): "
                           f"{message[-1] if message else 'no output'}")


def render_stems(stems: Sequence[tuple[float, list[Part]]], soundfont: Path, workdir: Path, *,
                 sample_rate: int = SAMPLE_RATE) -> list[np.ndarray]:
    """Each stem as a (frames, 2) float32 array at `sample_rate`, rendered together by one FluidSynth process."""
    midi, wav = workdir / "batch.mid", workdir / "batch.wav"
    starts = write_midi(stems, midi)
    fluidsynth(midi, wav, soundfont, sample_rate)
    audio, rate = sf.read(wav, dtype="float32", always_2d=True)
    assert rate == sample_rate, rate
    asked = round(starts[-1] * sample_rate / TICKS_PER_SECOND) + round(stems[-1][0] * sample_rate)
    if len(audio) < asked:  # e.g. a full disk: the stems past the cut would read as silence
        free = shutil.disk_usage(workdir).free / 2 ** 20
        raise UserError(f"{wav}: FluidSynth wrote {len(audio) / sample_rate:.1f} s of the {asked / sample_rate:.1f} s "
                        f"asked for ({free:.0f} MiB free there); free disk space or set TMPDIR to a roomier disk, "
                        "then rerun")
    out = []
    for start, (seconds, _) in zip(starts, stems):
        first, frames = round(start * sample_rate / TICKS_PER_SECOND), round(seconds * sample_rate)
        piece = audio[first: first + frames]
        out.append(np.pad(piece, ((0, frames - len(piece)), (0, 0))))
    return out


def _rms(audio: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(audio, dtype=np.float64))))


def mix(clip: Clip, stems: Sequence[np.ndarray], soundfont: Path, sample_rate: int) -> np.ndarray:
    """Colour each stem, scale it to its level (by RMS), sum, set the loudness and keep the peak below full scale."""
    total = np.zeros_like(stems[0], dtype=np.float64)
    for audio, level in zip((colour(stem, clip.tone, sample_rate) for stem in stems), clip.levels):
        rms = _rms(audio)
        if rms < 1e-6:
            raise UserError(f"{soundfont}: rendered silence for programs "
                            f"{sorted({p.program for stem in clip.stems for p in stem})} of {clip.path}; "
                            "pass --soundfont with a complete General MIDI SoundFont")
        total += audio * (10 ** (level / 20) / rms)
    total *= 10 ** (clip.loudness / 20) / _rms(total)
    peak = float(np.max(np.abs(total)))
    if peak > 0.97:
        total *= 0.97 / peak
    return total.astype(np.float32)


def render_batch(clips: Sequence[Clip], soundfont: Path, out: Path, sample_rate: int = SAMPLE_RATE) -> list[dict]:
    """Render, mix and write a batch of clips (atomically: temp name, then rename); their summaries."""
    with tempfile.TemporaryDirectory(prefix="timbre-synth-") as tmp:
        stems = render_stems([(clip.seconds, parts) for clip in clips for parts in clip.stems], soundfont, Path(tmp),
                             sample_rate=sample_rate)
    summaries, cursor = [], 0
    for clip in clips:
        audio = mix(clip, stems[cursor: cursor + len(clip.stems)], soundfont, sample_rate)
        cursor += len(clip.stems)
        path = out / clip.path
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(path.name + ".tmp")
        sf.write(temp, audio, sample_rate, subtype="PCM_16", format="WAV")
        os.replace(temp, path)
        if clip.labels:
            path.with_suffix(".txt").write_text("".join(f"{code}{clip.label_suffix}\n" for code in clip.labels))
        summaries.append({"path": clip.path, "seconds": clip.seconds, "soundfont": soundfont.name, **clip.info})
    return summaries


def batches(clips: Sequence[Clip], seconds: float = BATCH_SECONDS) -> list[list[Clip]]:
    """Consecutive clips grouped up to `seconds` of stem audio: fixed by the clip list, not by the workers."""
    groups: list[list[Clip]] = [[]]
    used = 0.0
    for clip in clips:
        length = clip.seconds * len(clip.stems)
        if groups[-1] and used + length > seconds:
            groups.append([])
            used = 0.0
        groups[-1].append(clip)
        used += length
    return [group for group in groups if group]


# --- Entry points --------------------------------------------------------------------------


def bundled_soundfont() -> Path:
    """TimGM6mb.sf2, the small GM SoundFont inside pretty_midi's wheel (a second timbre set for cross-font tests)."""
    import pretty_midi

    return Path(pretty_midi.__file__).parent / "TimGM6mb.sf2"


def default_soundfont() -> Path:
    """FluidR3_GM when the system has it (fluid-soundfont-gm), else pretty_midi's TimGM6mb."""
    return FLUIDR3 if FLUIDR3.exists() else bundled_soundfont()


def check_tools(soundfont: Path) -> None:
    """Fail early, in one line, when FluidSynth or the SoundFont is missing or not a SoundFont (.sf2 or .sf3)."""
    if shutil.which("fluidsynth") is None:
        raise UserError(f"fluidsynth: program not found on PATH; {INSTALL_HINT}")
    if not soundfont.is_file():
        raise UserError(f"{soundfont}: SoundFont not found; pass --soundfont with General MIDI .sf2/.sf3 files "
                        f"or {INSTALL_HINT}")
    try:
        with open(soundfont, "rb") as handle:
            header = handle.read(12)
    except OSError as error:
        raise UserError(f"{soundfont}: cannot read the SoundFont ({error.strerror}); check its permissions") from None
    if header[:4] != b"RIFF" or header[8:12] != b"sfbk":  # .sf3 keeps the .sf2 container, with compressed samples
        raise UserError(f"{soundfont}: not a SoundFont file (.sf2 or .sf3); pass --soundfont with General MIDI "
                        "SoundFonts")
