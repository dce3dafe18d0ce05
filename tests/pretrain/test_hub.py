"""Hub folders: plain transformers (in a process that never imports Timbre) reproduces Timbre's backbone;
Timbre loads its own folders and public-style AST checkpoints (overlapping stride 10, classifier heads)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi
from safetensors.torch import save_file
from transformers import ASTConfig, ASTFeatureExtractor, ASTForAudioClassification, ASTModel

from core.errors import UserError
from pretrain.__main__ import main
from pretrain.backbone import Backbone, BackboneConfig, ModelConfig
from pretrain.frontend import FrontendConfig, LogMel
from pretrain.hub import load_backbone, load_for_training, publish, save_pretrained

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4

TRANSFORMERS_ONLY = """
import sys
import numpy as np
import torch
from transformers import AutoFeatureExtractor, AutoModel

folder, audio_path, out_path = sys.argv[1:]
extractor = AutoFeatureExtractor.from_pretrained(folder)
model, info = AutoModel.from_pretrained(folder, output_loading_info=True)
inputs = extractor(list(np.load(audio_path)), sampling_rate=16000, return_tensors="pt")
with torch.no_grad():
    output = model.eval()(**inputs)
timbre = sorted(name for name in sys.modules if name.split(".")[0] in ("pretrain", "shards", "finetune"))
np.savez(out_path, hidden=output.last_hidden_state.numpy(), pooled=output.pooler_output.numpy(),
         features=inputs["input_values"].numpy(), model=type(model).__name__, extractor=type(extractor).__name__,
         problems=sorted(map(str, [*info["missing_keys"], *info["unexpected_keys"], *info["mismatched_keys"]])),
         timbre=np.array(timbre, dtype=str))
"""


def perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move every weight off its initial value so that a mix-up of any two tensors shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model.eval()


def clips(seconds: float = 3.0, count: int = 2) -> torch.Tensor:
    """Harmonic tones with noise at 16 kHz: (count, samples)."""
    t = torch.arange(int(seconds * 16000)) / 16000
    tones = [sum(0.2 / k * torch.sin(2 * torch.pi * f0 * k * t) for k in range(1, 6)) for f0 in (196.0, 523.25)]
    noise = torch.randn(count, t.numel(), generator=torch.Generator().manual_seed(0)) * 0.01
    return torch.stack(tones[:count]) + noise


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Backbone, Path]:
    torch.manual_seed(0)
    frontend = FrontendConfig(mean=-3.5, std=4.0)
    backbone = perturb(Backbone(BackboneConfig.from_size("tiny", num_layers=2, max_frames=298, frontend=frontend)))
    folder = save_pretrained(backbone, tmp_path_factory.mktemp("hub") / "tiny",
                             card={"data": ["synthetic IRMAS"], "objectives": {"mae": 1.0}, "steps": 10,
                                   "metrics": {"macro_f1": 0.5}, "recipe": {"model": {"size": "tiny"}}})
    return backbone, folder


def test_folder_is_a_plain_transformers_ast(exported) -> None:
    backbone, folder = exported
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md", "config.json", "model.safetensors", "preprocessor_config.json"]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "audio-spectrogram-transformer" and "auto_map" not in config
    assert (config["max_length"], config["frequency_stride"], config["time_stride"]) == (298, 16, 16)
    extractor = json.loads((folder / "preprocessor_config.json").read_text())
    assert (extractor["max_length"], extractor["mean"], extractor["std"]) == (298, -3.5, 4.0)
    card = (folder / "README.md").read_text()
    assert "library_name: transformers" in card and "AutoModel.from_pretrained" in card
    assert "synthetic IRMAS" in card and "macro_f1: 0.5" in card and "10 optimisation steps" in card


def test_transformers_in_a_fresh_process_reproduces_timbre(exported, tmp_path: Path) -> None:
    backbone, folder = exported
    audio = clips()
    np.save(tmp_path / "audio.npy", audio.numpy())
    subprocess.run([sys.executable, "-c", TRANSFORMERS_ONLY, str(folder), str(tmp_path / "audio.npy"),
                    str(tmp_path / "out.npz")], check=True, timeout=120, cwd=tmp_path,
                   env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""})
    result = np.load(tmp_path / "out.npz")
    assert (str(result["model"]), str(result["extractor"])) == ("ASTModel", "ASTFeatureExtractor")
    assert list(result["problems"]) == [] and list(result["timbre"]) == []
    with torch.no_grad():
        features = LogMel(config=backbone.config.frontend)(audio)
        ours = backbone(features)
    # float32 rounding (pretrain/frontend.py): the lowest mel bins, fed by a few FFT bins, reached 1.13e-4 on an
    # AVX-512 Xeon in a fresh process (9.9e-5 in this one); 99.9% of the values agree within 2e-5
    assert np.abs(result["features"] - features.numpy()).max() < 2 * TOLERANCE
    assert np.abs(result["hidden"] - ours.hidden.numpy()).max() < TOLERANCE
    assert np.abs(result["pooled"] - ours.embedding.numpy()).max() < TOLERANCE


def test_timbre_folder_round_trips_exactly(exported) -> None:
    backbone, folder = exported
    loaded = load_backbone(str(folder))
    assert loaded.config == backbone.config
    assert all(torch.equal(loaded.state_dict()[name], tensor) for name, tensor in backbone.state_dict().items())


@pytest.mark.parametrize("head", [False, True], ids=["ASTModel", "ASTForAudioClassification"])
def test_loads_overlapping_stride_10_ast_checkpoints(tmp_path: Path, head: bool) -> None:
    """The layout of MIT/ast-finetuned-audioset-10-10-0.4593, small: 16x16 patches every 10 bins and frames."""
    torch.manual_seed(0)
    config = ASTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                       frequency_stride=10, time_stride=10, max_length=200, num_labels=5)
    model = perturb(ASTForAudioClassification(config) if head else ASTModel(config))
    model.save_pretrained(tmp_path)
    ASTFeatureExtractor(max_length=200).save_pretrained(tmp_path)
    backbone = load_backbone(str(tmp_path))
    assert (backbone.config.frequency_stride, backbone.config.time_stride, backbone.config.max_frames) == (10, 10, 200)
    assert backbone.grid(200) == (12, 19)
    features = torch.randn(2, 200, 128)
    with torch.no_grad():
        reference = (model.audio_spectrogram_transformer if head else model)(features)
        ours = backbone(features)
    torch.testing.assert_close(ours.hidden, reference.last_hidden_state, rtol=0, atol=TOLERANCE)
    torch.testing.assert_close(ours.embedding, reference.pooler_output, rtol=0, atol=TOLERANCE)


def test_a_saved_backbone_trains_on_overlapping_patches_with_its_positions_resampled(exported, tmp_path: Path) -> None:
    """model.frequency_stride beside a saved non-overlapping backbone (AST's way with ImageNet patches): the same
    weights slide every 4 bins; new patch j is centred where old patch j/4 would be, so its position is that one,
    interpolated; the result is still a plain transformers AST."""
    backbone, folder = exported
    fitted = load_for_training(str(folder), model=ModelConfig(size="tiny", frequency_stride=4), sample_rate=16000,
                               frames=298, given=f"backbone={folder}", source="recipe.yaml")
    assert (fitted.config.frequency_stride, fitted.config.time_stride) == (4, 16)
    assert (backbone.grid(298), fitted.grid(298)) == ((8, 18), (29, 18))
    old, new = backbone.grid_position.detach(), fitted.grid_position.detach()
    torch.testing.assert_close(new[::4], old, rtol=0, atol=1e-6)
    torch.testing.assert_close(new[2], (old[0] + old[1]) / 2, rtol=0, atol=1e-6)
    torch.testing.assert_close(new[5], 0.75 * old[1] + 0.25 * old[2], rtol=0, atol=1e-6)
    assert all(torch.equal(fitted.state_dict()[name], tensor) for name, tensor in backbone.state_dict().items()
               if name != "grid_position")
    shorter = load_for_training(str(folder), model=ModelConfig(size="tiny", frequency_stride=4), sample_rate=16000,
                                frames=100, given=f"backbone={folder}", source="recipe.yaml")
    torch.testing.assert_close(shorter.grid_position, fitted.grid_position[:, :shorter.grid(100)[1]], rtol=0, atol=0)

    saved = save_pretrained(fitted, tmp_path / "regridded")
    reference = ASTModel.from_pretrained(saved).eval()
    features = torch.randn(2, 298, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(fitted.eval()(features).hidden, reference(features).last_hidden_state, rtol=0,
                                   atol=TOLERANCE)

    with pytest.raises(UserError, match=r"^recipe.yaml: model: frequency_stride and time_stride must be 1..patch_size "
                                        r"\(16\), got 17 and 16$"):
        load_for_training(str(folder), model=ModelConfig(size="tiny", frequency_stride=17), sample_rate=16000,
                          frames=298, given=f"backbone={folder}", source="recipe.yaml")
    with pytest.raises(UserError, match=r"^recipe.yaml: model.num_layers shapes a backbone trained from scratch, but "
                                        rf"backbone={folder} is given; drop one of the two \(override "
                                        r"model.num_layers=null\)$"):
        load_for_training(str(folder), model=ModelConfig(size="tiny", num_layers=3, frequency_stride=4),
                          sample_rate=16000, frames=298, given=f"backbone={folder}", source="recipe.yaml")


def test_a_saved_backbone_fine_tunes_with_the_dropout_the_recipe_sets(exported, tmp_path: Path) -> None:
    """model.dropout beside a saved backbone replaces its rate (as from_pretrained(..., hidden_dropout_prob=...) does),
    keeping every weight: it regularises the fine-tune, it does not shape the backbone."""
    backbone, folder = exported
    fitted = load_for_training(str(folder), model=ModelConfig(size="tiny", dropout=0.1), sample_rate=16000,
                               frames=298, given=f"backbone={folder}", source="recipe.yaml")
    assert (backbone.config.dropout, fitted.config.dropout) == (0.0, 0.1)
    assert all(torch.equal(fitted.state_dict()[name], tensor) for name, tensor in backbone.state_dict().items())
    features = torch.randn(2, 298, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert not torch.equal(fitted.train()(features).hidden, fitted.train()(features).hidden)
        torch.testing.assert_close(fitted.eval()(features).hidden, backbone.eval()(features).hidden, rtol=0, atol=0)
    saved = json.loads((save_pretrained(fitted, tmp_path / "dropout") / "config.json").read_text())
    assert (saved["hidden_dropout_prob"], saved["attention_probs_dropout_prob"]) == (0.1, 0.1)
    with pytest.raises(UserError, match=r"^recipe.yaml: model: dropout is a probability in \[0, 1\); got 1.0$"):
        load_for_training(str(folder), model=ModelConfig(size="tiny", dropout=1.0), sample_rate=16000, frames=298,
                          given=f"backbone={folder}", source="recipe.yaml")


def test_load_errors_name_the_file_and_the_fix(tmp_path: Path, exported) -> None:
    _, folder = exported
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((folder / "config.json").read_text())
    torch.save({}, pickled / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"pickled: no \.safetensors weights .*safetensors only"):
        load_backbone(str(pickled))
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UserError, match="model_type is 'bert'"):
        load_backbone(str(wrong))
    deeper = tmp_path / "deeper"
    deeper.mkdir()
    (deeper / "config.json").write_text(json.dumps({**json.loads((folder / "config.json").read_text()),
                                                    "num_hidden_layers": 3}))
    save_file({}, deeper / "model.safetensors")
    with pytest.raises(UserError, match="weights do not match config.json"):
        load_backbone(str(deeper))
    impossible = tmp_path / "impossible"
    impossible.mkdir()
    (impossible / "config.json").write_text(json.dumps({**json.loads((folder / "config.json").read_text()),
                                                        "num_attention_heads": 5}))
    (impossible / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(UserError, match=r"^\S*impossible/config.json: hidden_size \d+ is not divisible by "
                                        r"num_heads 5; fix it or re-export the folder$"):
        load_backbone(str(impossible))
    with pytest.raises(UserError, match="not in the Hub cache, and HF_HUB_OFFLINE is set; unset it"):
        load_backbone("timbre-tests/not-a-cached-model")


def test_a_hub_id_without_network_says_so_not_offline_mode(tmp_path) -> None:
    """HF_HUB_OFFLINE unset and the Hub unreachable (a closed loopback port as the endpoint)."""
    env = {key: value for key, value in os.environ.items() if key not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_ENDPOINT="http://127.0.0.1:9", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-m", "pretrain", "embed", "nobody/nothing-here", str(tmp_path / "a.wav"),
                             "--out", str(tmp_path / "x.npz")], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "the Hugging Face Hub cannot be reached (no network?)" in result.stderr
    assert "HF_HUB_OFFLINE" not in result.stderr


def test_publish_makes_one_commit_of_the_folder(exported, monkeypatch) -> None:
    _, folder = exported
    calls = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: calls.update(repo=(repo_id, kwargs)))
    monkeypatch.setattr(HfApi, "create_commit", lambda self, repo_id, **kwargs: calls.update(commit=(repo_id, kwargs)))
    files = publish(folder, "someone/timbre-tiny", private=True, token="hf_test")
    assert files == ["README.md", "config.json", "model.safetensors", "preprocessor_config.json"]
    assert calls["repo"] == ("someone/timbre-tiny", {"private": True, "exist_ok": True, "repo_type": "model"})
    repo_id, commit = calls["commit"]
    assert repo_id == "someone/timbre-tiny"
    assert [op.path_in_repo for op in commit["operations"]] == files
    for op in commit["operations"]:
        assert Path(op.path_or_fileobj).read_bytes() == (folder / op.path_in_repo).read_bytes()


def test_publish_dry_run_lists_the_files_without_a_token(exported, capsys) -> None:
    _, folder = exported
    assert main(["publish", str(folder), "--repo-id", "someone/timbre-tiny", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "would upload 4 files to https://huggingface.co/someone/timbre-tiny" in printed
    assert all(f"  {name}\n" in printed for name in ("README.md", "config.json", "model.safetensors"))


def test_publish_without_a_token_stops_with_one_line(exported, tmp_path: Path) -> None:
    _, folder = exported
    env = {name: value for name, value in os.environ.items() if name not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_HUB_OFFLINE="1")  # no stored login either
    refused = subprocess.run([sys.executable, "-m", "pretrain", "publish", str(folder), "--repo-id", "someone/x"],
                             capture_output=True, text=True, env=env, timeout=120)
    assert refused.returncode == 2
    assert refused.stderr.strip().count("\n") == 0 and refused.stderr.startswith("error: ")
    assert "hf auth login" in refused.stderr
