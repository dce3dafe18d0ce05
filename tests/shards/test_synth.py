"""The synthetic IRMAS-like set: real FluidSynth renders read back by the real IRMAS parsers."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from core.errors import UserError
from shards import synth
from shards.sources import TRAIN_DIR, scan
from shards.synth import music, plans, render
from shards.vocab import DRUMS, GENRES, INSTRUMENTS, parse_instruments

pytestmark = pytest.mark.skipif(shutil.which("fluidsynth") is None, reason="FluidSynth is not installed")

OPTIONS = dict(train_per_class=2, test_files=3, unlabeled=3, seed=7)
TRAIN_FRAMES = round(plans.TRAIN_SECONDS * render.SAMPLE_RATE)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "set"
    synth.synthesize(out, workers=2, progress=False, **OPTIONS)
    return out


def wavs(root: Path) -> list[Path]:
    return sorted(root.rglob("*.wav"))


def test_layout_parses_as_irmas(tree):
    train = scan("irmas-train", tree / TRAIN_DIR)
    assert not train.skips and not train.ignored
    assert [r.instruments for r in train.records].count(("cel",)) == OPTIONS["train_per_class"]
    assert sorted({r.instruments[0] for r in train.records}) == sorted(INSTRUMENTS)
    for record in train.records:
        assert record.genre in GENRES and record.drums in (*DRUMS, None)
        assert record.relpath.split("/")[0] == record.instruments[0]
        assert re.fullmatch(r"(\d{3}__)?\[(\w{3})\](\[(dru|nod)\])?\[\w+\]\d{4}__\d\.wav", record.relpath.split("/")[1])
    songs = {r.song for r in train.records}
    assert len(songs) < len(train.records)  # some songs have several __K excerpts

    test = scan("irmas-test", tree / plans.TEST_DIR)
    assert not test.skips and len(test.records) == OPTIONS["test_files"]
    for record in test.records:
        assert 1 <= len(record.instruments) <= 4
        assert record.relpath.startswith(f"{plans.TEST_INNER_DIR}/") and re.search(r"-\d+\.wav$", record.relpath)

    unlabeled = scan("folder", tree / plans.UNLABELED_DIR)
    assert len(unlabeled.records) == OPTIONS["unlabeled"]

    summary = json.loads((tree / synth.SUMMARY).read_text())
    assert summary["complete"] and summary["counts"] == {
        "train": 11 * OPTIONS["train_per_class"], "test": OPTIONS["test_files"], "unlabeled": OPTIONS["unlabeled"]}
    assert summary["options"]["seed"] == OPTIONS["seed"]
    assert summary["train_instruments"] == {code: OPTIONS["train_per_class"] for code in sorted(INSTRUMENTS)}


def test_audio_format_and_durations(tree):
    for path in wavs(tree):
        info = sf.info(path)
        assert (info.samplerate, info.channels, info.subtype, info.format) == (44100, 2, "PCM_16", "WAV"), path
        audio, _ = sf.read(path)
        assert np.sqrt(np.mean(audio**2)) > 1e-3 and np.abs(audio).max() < 1.0, path
        where = path.relative_to(tree).parts[0]
        if where == TRAIN_DIR:
            assert info.frames == TRAIN_FRAMES
        else:
            low, high = plans.TEST_SECONDS if where == plans.TEST_DIR else plans.UNLABELED_SECONDS
            assert low <= info.duration <= high + 0.01, (path, info.duration)
    assert not list(tree.rglob("*.tmp"))


def test_label_files(tree):
    labels = sorted((tree / plans.TEST_DIR).rglob("*.txt"))
    assert len(labels) == OPTIONS["test_files"]
    for path in labels:
        text = path.read_text()
        assert path.with_suffix(".wav").is_file()
        assert re.fullmatch(r"(\w{3}[\t ]?\n){1,4}", text), text
        codes = parse_instruments(text)
        assert len(codes) == len(text.splitlines())


def test_test_names_are_awkward_like_irmas():
    names = [Path(clip.path).stem for clip in plans.test_clips(0, 80)]
    assert len(set(names)) == len(names)
    assert all(re.fullmatch(r".+-\d", name) for name in names)
    for character in " .,'&\"()":
        assert any(character in name for name in names), character
    songs = {re.sub(r"-\d+$", "", name) for name in names}
    assert len(songs) < len(names)


def test_same_seed_same_bytes_whatever_the_workers(tree, tmp_path):
    again = tmp_path / "again"
    synth.synthesize(again, workers=1, progress=False, **OPTIONS)
    first, second = wavs(tree), wavs(again)
    assert [p.relative_to(tree) for p in first] == [p.relative_to(again) for p in second]
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes(), a
    for a in sorted((tree / plans.TEST_DIR).rglob("*.txt")):
        assert a.read_bytes() == (again / a.relative_to(tree)).read_bytes()
    assert (tree / synth.SUMMARY).read_bytes() == (again / synth.SUMMARY).read_bytes()

    other = plans.test_clips(OPTIONS["seed"] + 1, 4)
    assert [c.path for c in other] != [c.path for c in plans.test_clips(OPTIONS["seed"], 4)]


def test_sample_rate_option_renders_at_that_rate(tmp_path):
    """At 16 kHz (the models' rate) clips have their lengths at that rate, every stem still lands on FluidSynth's
    blocks (the batch a clip shares changes nothing), the EQ follows the rate, and off-grid rates are refused."""
    options = dict(train_per_class=2, test_files=1, unlabeled=0, seed=4, sample_rate=16000, progress=False)
    one, two = tmp_path / "one", tmp_path / "two"
    synth.synthesize(one, workers=1, **options)
    summary = synth.synthesize(two, workers=2, **options)
    assert summary["options"]["sample_rate"] == 16000
    for a in wavs(one):
        info = sf.info(a)
        assert info.samplerate == 16000 and info.subtype == "PCM_16", a
        if TRAIN_DIR in str(a):
            assert info.frames == round(plans.TRAIN_SECONDS * 16000), a
        assert a.read_bytes() == (two / a.relative_to(one)).read_bytes(), a
    clip = plans.train_clips(4, 2)[0]
    mixture, _ = sf.read(one / clip.path, dtype="float32", always_2d=True)
    _, unexplained = fit(mixture, stems_alone(clip, tmp_path, sample_rate=16000))
    assert unexplained < 1e-3
    result = subprocess.run([sys.executable, "-m", "shards", "synth", str(tmp_path / "odd"), "--train-per-class", "1",
                             "--sample-rate", "22050"], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "not a multiple of 100 Hz" in result.stderr
    assert not (tmp_path / "odd").exists()


def fit(mixture: np.ndarray, stems: list[np.ndarray]) -> tuple[np.ndarray, float]:
    """Least-squares gains of `stems` that best explain `mixture`, and the unexplained energy fraction."""
    basis = np.stack([s.reshape(-1) for s in stems], axis=1).astype(np.float64)
    target = mixture.reshape(-1).astype(np.float64)
    gains, *_ = np.linalg.lstsq(basis, target, rcond=None)
    residual = target - basis @ gains
    return gains, float(residual @ residual / (target @ target))


def stems_alone(clip: plans.Clip, tmp: Path, *, sample_rate: int = render.SAMPLE_RATE) -> list[np.ndarray]:
    """Each stem of `clip` rendered alone, afresh, and coloured with the clip's tone."""
    return [render.colour(render.render_stems([(clip.seconds, parts)], render.default_soundfont(), tmp,
                                              sample_rate=sample_rate)[0], clip.tone, sample_rate)
            for parts in clip.stems]


def contributions(tree: Path, clip: plans.Clip, tmp: Path) -> list[float]:
    """RMS (dB) of each stem inside the written file, found by rendering each stem alone, afresh."""
    mixture, _ = sf.read(tree / clip.path, dtype="float32", always_2d=True)
    stems = stems_alone(clip, tmp)
    gains, unexplained = fit(mixture, stems)
    assert unexplained < 1e-3, (clip.path, unexplained)  # the file is its stems: nothing bleeds from batch neighbours
    return [20 * np.log10(abs(g) * np.sqrt(np.mean(s.astype(np.float64) ** 2))) for g, s in zip(gains, stems)]


def test_predominant_instrument_is_clearly_louder(tree, tmp_path):
    clips = plans.train_clips(OPTIONS["seed"], OPTIONS["train_per_class"])
    checked = 0
    for clip in clips[::4]:
        if len(clip.stems) < 2:
            continue
        lead, accompaniment = contributions(tree, clip, tmp_path)
        assert lead - accompaniment >= 6.0, (clip.path, lead, accompaniment)
        assert len(clip.stems[0]) == 1 and clip.stems[0][0].program in {
            p.program for p in music.TIMBRES[clip.info["instrument"]].patches}
        checked += 1
    assert checked >= 3


def test_every_labelled_instrument_is_audible(tree, tmp_path):
    clips = [c for c in plans.test_clips(OPTIONS["seed"], OPTIONS["test_files"]) if len(c.labels) > 1]
    assert clips
    for clip in sorted(clips, key=lambda c: c.seconds)[:1]:
        levels = contributions(tree, clip, tmp_path)
        labelled = levels[: len(clip.labels)]
        assert max(labelled) - min(labelled) <= 6.5, (clip.path, levels)
        assert all(level < min(labelled) for level in levels[len(clip.labels):]), (clip.path, levels)


def test_rerun_is_a_no_op_and_new_options_replace_the_tree(tmp_path):
    out = tmp_path / "set"
    small = dict(train_per_class=1, test_files=1, unlabeled=1, seed=1, workers=1, progress=False)
    synth.synthesize(out, **small)
    first = {p: p.stat().st_mtime_ns for p in wavs(out)}
    assert synth.synthesize(out, **small)["counts"]["train"] == 11
    assert {p: p.stat().st_mtime_ns for p in wavs(out)} == first
    synth.synthesize(out, **{**small, "test_files": 0, "unlabeled": 2})
    assert not (out / plans.TEST_DIR).exists() and len(wavs(out / plans.UNLABELED_DIR)) == 2

    foreign = tmp_path / "foreign"
    (foreign / TRAIN_DIR).mkdir(parents=True)
    with pytest.raises(UserError, match="not written by shards synth"):
        synth.synthesize(foreign, **small)


def test_vocabulary_tables_are_checked():
    assert list(music.TIMBRES) == list(INSTRUMENTS) and list(music.STYLES) == list(GENRES)
    with pytest.raises(RuntimeError, match="missing"):
        music._by_code({"cello": 1}, {"a": "cello", "b": "flute"}, ("a", "b"), "instrument")


def test_missing_soundfont_is_one_line_error(tmp_path):
    missing = tmp_path / "no-such-font.sf2"
    result = subprocess.run([sys.executable, "-m", "shards", "synth", str(tmp_path / "out"), "--train-per-class", "1",
                             "--soundfont", str(missing)], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"error: {missing}: SoundFont not found")
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="not a SoundFont"):
        render.check_tools(Path(__file__))


def _mono(path: Path) -> np.ndarray:
    return sf.read(path, always_2d=True)[0].mean(axis=1)


def spectrum(audio: np.ndarray) -> np.ndarray:
    """Log of the mean magnitude spectrum over 2048-sample frames: the timbre of a clip, whatever its phases."""
    frames = audio[: len(audio) // 2048 * 2048].reshape(-1, 2048)
    return np.log(np.abs(np.fft.rfft(frames * np.hanning(2048))).mean(axis=0) + 1e-6)


def test_each_clip_draws_one_of_several_soundfonts(tmp_path):
    fonts = [render.default_soundfont(), render.bundled_soundfont()]
    if fonts[0] == fonts[1]:
        pytest.skip("needs FluidR3_GM (fluid-soundfont-gm) next to pretty_midi's TimGM6mb")
    options = dict(train_per_class=2, test_files=0, unlabeled=0, seed=3)
    summary = synth.synthesize(tmp_path / "two", soundfonts=fonts, workers=2, progress=False, **options)
    assert summary["options"]["soundfonts"] == [str(font.resolve()) for font in fonts]
    used = {item["path"]: item["soundfont"] for item in summary["clips"]["train"]}
    assert set(used.values()) == {font.name for font in fonts}
    assert summary["soundfonts"] == {name: list(used.values()).count(name) for name in set(used.values())}
    # A clip drawn for a font sounds like that clip rendered with that font alone, not like it rendered with the other
    # (FluidSynth renders a batch as one stream, so the samples differ slightly with the batch's other clips).
    alone = {font.name: synth.synthesize(tmp_path / font.stem, soundfonts=[font], workers=2, progress=False, **options)
             for font in fonts}
    for path, name in used.items():
        assert {item["soundfont"] for item in alone[name]["clips"]["train"]} == {name}
        distance = {other: np.abs(spectrum(_mono(tmp_path / "two" / path))
                                  - spectrum(_mono(tmp_path / Path(other).stem / path))).mean() for other in alone}
        assert min(distance, key=distance.get) == name, (path, distance)
    with pytest.raises(UserError, match="names a SoundFont twice"):
        synth.synthesize(tmp_path / "dup", soundfonts=[fonts[1], fonts[1]], progress=False, **options)


def test_font_pairs_hold_one_rendering_per_channel(tmp_path):
    fonts = [render.default_soundfont(), render.bundled_soundfont()]
    if fonts[0] == fonts[1]:
        pytest.skip("needs FluidR3_GM (fluid-soundfont-gm) next to pretty_midi's TimGM6mb")
    options = dict(train_per_class=1, test_files=0, unlabeled=3, seed=5, soundfonts=fonts, workers=2, progress=False)
    paired = synth.synthesize(tmp_path / "paired", pair_fonts=True, **options)
    single = synth.synthesize(tmp_path / "single", **options)
    for font in fonts:
        synth.synthesize(tmp_path / font.stem, **{**options, "soundfonts": [font]})
    assert paired["options"]["pair_fonts"] and sorted(path.name for path in (tmp_path / "paired" / "unlabeled").iterdir()) \
        == ["track-00001.wav", "track-00002.wav", "track-00003.wav"]  # no second renderings left behind
    assert paired["clips"]["train"] == single["clips"]["train"]  # only the unlabeled clips are paired
    assert sum(paired["soundfonts"].values()) == len(paired["clips"]["train"]) + 2 * 3
    for item, plain in zip(paired["clips"]["unlabeled"], single["clips"]["unlabeled"]):
        first, second = item["soundfont"]
        assert first == plain["soundfont"] and second != first and {first, second} == {font.name for font in fonts}
        audio, _ = sf.read(tmp_path / "paired" / item["path"], always_2d=True)
        reference, _ = sf.read(tmp_path / "single" / item["path"], always_2d=True)
        assert audio.shape == (len(reference), 2)
        assert np.abs(audio[:, 0] - reference.mean(axis=1)).max() <= 2 / 32768  # the clip as drawn, mixed to mono
        # the other channel is the clip in the other font: closest to it rendered with that font alone
        alone = {font.name: sf.read(tmp_path / font.stem / item["path"], always_2d=True)[0].mean(axis=1)
                 for font in fonts}
        distance = {name: np.abs(spectrum(audio[:, 1]) - spectrum(mono)).mean() for name, mono in alone.items()}
        assert min(distance, key=distance.get) == second, distance
    with pytest.raises(UserError, match="--pair-fonts: .* pass at least two"):
        synth.synthesize(tmp_path / "one", pair_fonts=True, **{**options, "soundfonts": fonts[:1]})


def test_sf3_soundfonts_render(tmp_path):
    sf3 = Path("/usr/share/sounds/sf3/FluidR3Mono_GM.sf3")
    if not sf3.is_file():
        pytest.skip("needs fluidr3mono-gm-soundfont")
    summary = synth.synthesize(tmp_path / "sf3", soundfonts=[sf3], train_per_class=1, test_files=0, unlabeled=0,
                               workers=2, progress=False)
    audio, _ = sf.read(tmp_path / "sf3" / summary["clips"]["train"][0]["path"])
    assert np.abs(audio).max() > 0.01
