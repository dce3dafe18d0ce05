"""The batched on-device frontend computes what transformers' ASTFeatureExtractor computes."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pretty_midi
import pytest
import soundfile as sf
import torch
from transformers import ASTFeatureExtractor

from pretrain.frontend import FrontendConfig, LogMel, ResizeCrop, SpecAugment

SOUNDFONT = Path("/usr/share/sounds/sf2/FluidR3_GM.sf2")
TOLERANCE = 1e-4  # normalised log-mel units (one unit is 2 std of AudioSet log-mel)


def reference(waveforms: torch.Tensor) -> torch.Tensor:
    """transformers' features for each row, without padding (max_length = our frame count)."""
    frames = FrontendConfig().num_frames(waveforms.shape[-1])
    extractor = ASTFeatureExtractor(max_length=frames)
    return extractor(list(waveforms.numpy()), sampling_rate=16000, return_tensors="pt").input_values


@pytest.fixture(scope="module")
def music(tmp_path_factory) -> torch.Tensor:
    """3 s of a piano chord progression over a bass line, rendered by FluidSynth from a MIDI file at 16 kHz."""
    if shutil.which("fluidsynth") is None or not SOUNDFONT.exists():
        pytest.skip("FluidSynth and FluidR3_GM.sf2 are needed to render music (make system-deps)")
    folder = tmp_path_factory.mktemp("music")
    midi = pretty_midi.PrettyMIDI()
    piano, bass = pretty_midi.Instrument(program=0), pretty_midi.Instrument(program=33)
    for bar, root in enumerate((60, 65, 67, 60)):
        start = bar * 0.75
        piano.notes += [pretty_midi.Note(velocity=90, pitch=root + step, start=start, end=start + 0.7) for step in (0, 4, 7)]
        bass.notes.append(pretty_midi.Note(velocity=100, pitch=root - 24, start=start, end=start + 0.5))
    midi.instruments += [piano, bass]
    midi.write(str(folder / "song.mid"))
    subprocess.run(["fluidsynth", "-ni", "-q", "-F", str(folder / "song.wav"), "-r", "16000", "-g", "0.8",
                    str(SOUNDFONT), str(folder / "song.mid")], check=True, capture_output=True, timeout=60)
    audio, rate = sf.read(folder / "song.wav", dtype="float32", always_2d=True)
    assert rate == 16000 and np.abs(audio).max() > 0.01, "FluidSynth rendered silence"
    return torch.from_numpy(audio.mean(axis=1)[:48000].copy())


def test_random_waveforms_match_the_transformers_extractor() -> None:
    generator = torch.Generator().manual_seed(0)
    waveforms = (torch.rand(3, 16000, generator=generator) * 2 - 1) * torch.tensor([[1.0], [0.1], [1e-3]])
    ours = LogMel()(waveforms)
    assert ours.shape == (3, 98, 128) and ours.dtype == torch.float32
    assert (ours - reference(waveforms)).abs().max() < TOLERANCE


def test_a_large_dc_offset_still_matches_the_transformers_extractor() -> None:
    """Kaldi removes each frame's mean before pre-emphasis; the batched order removes it after, so an offset must not
    cost precision (0.5 of full scale under quiet noise)."""
    generator = torch.Generator().manual_seed(1)
    waveforms = (torch.rand(3, 16000, generator=generator) * 2 - 1) * 0.1 + torch.tensor([[0.5], [-0.5], [0.05]])
    assert (LogMel()(waveforms) - reference(waveforms)).abs().max() < TOLERANCE


def test_music_matches_the_transformers_extractor(music: torch.Tensor) -> None:
    ours = LogMel()(music[None])
    assert ours.shape == (1, 298, 128)
    assert (ours - reference(music[None])).abs().max() < TOLERANCE
    assert ours.std() > 0.1  # a real spectrogram, not a floor


def test_batched_equals_one_by_one_and_ignores_autocast(music: torch.Tensor) -> None:
    batch = torch.stack([music, music.flip(0) * 0.5, torch.zeros_like(music)])
    frontend = LogMel()
    together = frontend(batch)
    alone = torch.cat([frontend(row[None]) for row in batch])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = frontend(batch)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, together, rtol=0, atol=1e-5)


@pytest.mark.parametrize("samples", [399, 400, 559, 560, 48000])
def test_frame_count_is_kaldis(samples: int) -> None:
    frontend = LogMel()
    expected = reference(torch.ones(1, samples) * 0.1).shape[1] if samples >= 400 else 0
    assert frontend.num_frames(samples) == expected
    if samples < 400:
        with pytest.raises(ValueError, match="at least 400 samples"):
            frontend(torch.zeros(1, samples))
    else:
        assert frontend(torch.rand(2, samples)).shape == (2, expected, 128)


def test_spec_augment_masks_stripes_per_clip_and_only_in_training() -> None:
    torch.manual_seed(0)
    features = torch.randn(8, 298, 128) + 5.0  # no natural zeros
    augment = SpecAugment(freq_mask=24, time_mask=48, num_freq_masks=2, num_time_masks=2)
    assert augment.eval()(features) is features
    masked = augment.train()(features)
    zero = masked == 0
    assert torch.equal(masked[~zero], features[~zero])
    time_stripes = zero.all(dim=2)  # (B, frames): a time stripe zeroes every mel bin
    freq_stripes = zero.all(dim=1)  # (B, mels)
    assert torch.equal(zero, time_stripes[:, :, None] | freq_stripes[:, None, :])
    assert time_stripes.sum(dim=1).max() <= 2 * 47 and freq_stripes.sum(dim=1).max() <= 2 * 23
    assert zero.any(dim=(1, 2)).all()
    assert len({tuple(row.nonzero().flatten().tolist()) for row in time_stripes}) > 1  # clips differ


def test_resize_crop_stretches_a_window_of_each_clip_back_to_its_shape_in_training_only() -> None:
    torch.manual_seed(0)
    mels = torch.arange(128.0) + 1.0  # a ramp over the mel bins, the same in every frame
    features = mels.expand(16, 300, 128).clone()
    assert ResizeCrop().eval()(features) is features
    torch.testing.assert_close(ResizeCrop(frequency_scale=(1, 1), time_scale=(1, 1)).train()(features), features)

    narrowed = ResizeCrop(frequency_scale=(0.5, 0.5), time_scale=(1, 1)).train()(features)
    spans = narrowed[:, 0, -1] - narrowed[:, 0, 0]  # half the band spread over every bin: the ramp half as steep
    torch.testing.assert_close(spans, torch.full((16,), 63.5), atol=0.6, rtol=0)
    torch.testing.assert_close(narrowed, narrowed[:, :1].expand_as(narrowed))  # time untouched
    assert len({round(float(low), 2) for low in narrowed[:, 0, 0]}) > 8  # each clip's window at its own place

    shrunk = ResizeCrop(frequency_scale=(1, 1), time_scale=(1.5, 1.5)).train()(features)
    silent = (shrunk.abs() < 1e-6).all(dim=2).sum(dim=1)  # (clips,) frames outside the shrunk clip, at the mean
    assert ((silent >= 95) & (silent <= 105)).all()  # a third of 300 frames in every clip
    with pytest.raises(ValueError, match="resize-crop scales"):
        ResizeCrop(time_scale=(1.5, 0.6))


def test_warp_moves_a_tone_up_or_down_per_clip_in_training_only() -> None:
    time = torch.arange(48000) / 16000
    tone = torch.sin(2 * torch.pi * 1000.0 * time).repeat(64, 1)  # 64 clips of the same 1 kHz tone
    frontend = LogMel(warp=0.2)
    plain = LogMel()(tone)
    torch.testing.assert_close(frontend.eval()(tone), plain, rtol=0, atol=0)  # exported models never warp
    peak = plain[0].mean(dim=0).argmax()
    warped = frontend.train()(tone).mean(dim=1).argmax(dim=1)  # (clips,) peak mel bin of each clip
    assert (warped > peak).any() and (warped < peak).any()  # stretched and squeezed clips in one batch
    assert (warped - peak).abs().max() <= 20  # within the +-20% the warp allows (~15 mel bins at 1 kHz)
    with pytest.raises(ValueError, match="warp is the largest relative frequency stretch"):
        LogMel(warp=0.5)
