"""End-to-end pretraining runs on real packed shards: 2-process DDP, kill-and-resume, W&B offline, recipes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import ASTModel

from core.errors import UserError
from core.recipe import load_recipe
from core.trainer import cpu_has_bf16, latest_checkpoint, lr_factor, resolve_precision
from pretrain.train import PretrainRecipe
from shards.pack import PackOptions, pack

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
DDP_CPU = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", "0"]

CHECKSUM_SCRIPT = '''
import hashlib, sys
from pathlib import Path
from accelerate import PartialState
from core.recipe import load_recipe
from pretrain.train import PretrainRecipe, run

recipe = load_recipe(sys.argv[1], sys.argv[3:], PretrainRecipe)
model, state = run(recipe, source=sys.argv[1])
digest = hashlib.sha256()
for name, tensor in sorted(model.state_dict().items()):
    digest.update(name.encode())
    digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
process = PartialState()
Path(sys.argv[2], f"rank-{process.process_index}.txt").write_text(
    f"{state['step']} {digest.hexdigest()} {process.num_processes}")
'''


def environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
            "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def shards(irmas, tmp_path_factory) -> list[str]:
    """Real packed shards of uneven sizes: labelled IRMAS-layout clips and unlabeled segmented recordings."""
    root = tmp_path_factory.mktemp("pretrain-shards")
    labelled = irmas.train(root / "irmas", songs_per_class=2, excerpts=2, seconds=1.0)
    pack(labelled.root, root / "irmas-shards", options=PackOptions(source="irmas-train", shard_size=13),
         workers=1, progress=False)
    unlabeled = irmas.folder(root / "folder", seconds=7.0)
    pack(unlabeled.root, root / "unlabeled-shards",
         options=PackOptions(source="folder", shard_size=9, segment_seconds=1.0), workers=1, progress=False)
    return [str(root / "irmas-shards" / "train"), str(root / "unlabeled-shards" / "train")]


def tiny_recipe(path: Path, shards: list[str], output_dir: Path, **train) -> Path:
    """A deterministic tiny run with all four objectives, on augmented audio."""
    recipe = {
        "data": {"train": shards, "clip_seconds": 1.0, "shuffle_buffer": 16, "mix_max": 2},
        "model": {"size": "tiny", "hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128},
        "objectives": {
            "mae": {"weight": 1.0, "decoder_hidden_size": 32, "decoder_layers": 1, "decoder_heads": 2,
                    "decoder_intermediate_size": 64, "masking": "mixed"},
            "teacher": {"weight": 0.5, "predictor_hidden_size": 32, "predictor_layers": 1, "predictor_heads": 2,
                        "predictor_intermediate_size": 64},
            "electra": {"weight": 0.5},
            "metric": {"weight": 0.5, "projection_size": 32},
        },
        "augment": {"gain_db": 6.0, "filters": 0.5, "noise": 0.5, "reverb": 0.5},
        "train": {"steps": 8, "batch_size": 6, "lr": 1e-3, "warmup_steps": 2, "checkpoint_every": 4,
                  "log_every": 2, "seed": 3, **train},
        "tracking": "none",
        "output_dir": str(output_dir),
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.slow
def test_two_process_ddp_run_on_uneven_shards_keeps_ranks_identical(shards, tmp_path):
    recipe = tiny_recipe(tmp_path / "recipe.yaml", shards, tmp_path / "run", steps=6, checkpoint_every=3)
    script = tmp_path / "checksum.py"
    script.write_text(CHECKSUM_SCRIPT)
    env = {**environment(), "ACCELERATE_USE_CPU": "1"}
    probe = [f"probe.train={shards[0]}", f"probe.val={shards[0]}"]  # runs on the main process only
    result = subprocess.run([ACCELERATE, "launch", *DDP_CPU, str(script), str(recipe), str(tmp_path), *probe],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert output.count("step 0 validation: probe_lrap") == output.count("step 6 validation: probe_lrap") == 1
    ranks = [(tmp_path / f"rank-{rank}.txt").read_text().split() for rank in (0, 1)]
    assert ranks[0][2] == ranks[1][2] == "2"  # one process group of two ranks, not two lone processes
    assert ranks[0][0] == ranks[1][0] == "6"  # both ranks finished every step
    assert ranks[0][1] == ranks[1][1]  # identical parameters after training
    assert (tmp_path / "run" / "backbone" / "model.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-000003", "step-000006"]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_parameters_wandb_logs_offline_and_checkpoints_export(shards, run_module,
                                                                                             tmp_path):
    settings = {"steps": 16, "checkpoint_every": 4, "image_every": 8}
    whole = tiny_recipe(tmp_path / "whole.yaml", shards, tmp_path / "whole", **settings)
    # The whole run keeps its shards decoded in memory from its first epoch on; the killed and resumed one reads
    # them every epoch: both must end with the same parameters.
    result = run_module("pretrain", str(whole), "tracking=wandb", f"probe.train={shards[0]}", f"probe.val={shards[0]}",
                        "data.cache_gb=0.5", env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pretrained 16 steps" in result.stdout and str(tmp_path / "whole" / "backbone") in result.stdout
    assert json.loads((tmp_path / "whole" / "trainer_state.json").read_text())["epoch"] >= 1  # epochs from the cache
    assert "step 0 validation: probe_lrap" in result.stdout + result.stderr  # the starting weights' probe
    assert "step 16 validation: probe_lrap" in result.stdout + result.stderr  # the frozen-feature probe ran

    killed = tiny_recipe(tmp_path / "killed.yaml", shards, tmp_path / "killed", **settings)
    process = subprocess.Popen([PYTHON, "-m", "pretrain", str(killed)], env=environment(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = tmp_path / "killed" / "checkpoints" / "step-000004" / "trainer_state.json"
    deadline = time.monotonic() + 240
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert latest_checkpoint(tmp_path / "killed" / "checkpoints").name in ("step-000004", "step-000008", "step-000012")

    result = run_module("pretrain", str(killed), "resume=auto", f"probe.train={shards[0]}", f"probe.val={shards[0]}",
                        env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout
    output = result.stdout + result.stderr
    assert "step 16 validation: probe_lrap" in output and "step 0 validation" not in output  # no start probe on resume
    final_whole = load_file(tmp_path / "whole" / "checkpoints" / "step-000016" / "model.safetensors")
    final_resumed = load_file(tmp_path / "killed" / "checkpoints" / "step-000016" / "model.safetensors")
    assert final_whole.keys() == final_resumed.keys()
    for name in final_whole:
        assert torch.equal(final_whole[name], final_resumed[name]), name

    run_dir = next((tmp_path / "whole" / "wandb").glob("offline-run-*"))
    data = next(run_dir.glob("run-*.wandb")).read_bytes()
    for key in ("loss", "mae", "teacher", "teacher_target_std", "teacher_ema_decay", "electra", "metric",
                "metric_ntxent", "metric_triplet", "lr", "grad_norm", "clips_per_s", "val/probe_lrap", "val/probe_map",
                "mae/input-masked-reconstruction", "electra/corrupted-truth-detected"):
        assert bytes([len(key)]) + key.encode() in data, key  # protobuf strings: length byte + name
    assert list((run_dir / "files" / "media" / "images" / "mae").glob("*.png"))
    card = (tmp_path / "whole" / "backbone" / "README.md").read_text()
    assert "16 optimisation steps" in card and "mae" in card

    # `pretrain export`: a checkpoint's backbone as a Hub folder; the last one's is the run's own backbone
    checkpoints = tmp_path / "whole" / "checkpoints"
    for step in (12, 16):
        result = run_module("pretrain", "export", str(checkpoints / f"step-{step:06d}"))
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"(step {step}) in {tmp_path / 'whole' / f'backbone-step-{step:06d}'}" in result.stdout
    final, exported = (load_file(tmp_path / "whole" / folder / "model.safetensors")
                       for folder in ("backbone", "backbone-step-000016"))
    assert final.keys() == exported.keys() and all(torch.equal(final[name], exported[name]) for name in final)
    earlier = ASTModel.from_pretrained(tmp_path / "whole" / "backbone-step-000012")
    assert not torch.equal(earlier.state_dict()["embeddings.patch_embeddings.projection.weight"],
                           final["embeddings.patch_embeddings.projection.weight"])
    assert "12 optimisation steps" in (tmp_path / "whole" / "backbone-step-000012" / "README.md").read_text()
    again = run_module("pretrain", "export", str(checkpoints / "step-000012"))
    assert again.returncode == 2 and "backbone-step-000012: already exists" in again.stderr
    assert sorted(p.name for p in (tmp_path / "whole").iterdir() if p.name.startswith(("backbone", "."))) == [
        "backbone", "backbone-step-000012", "backbone-step-000016"]


def test_learning_rate_warms_up_then_follows_transformers_cosine_down_to_its_floor():
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    for rate in (0.0, 0.25, 1.0):
        reference = get_cosine_with_min_lr_schedule_with_warmup(optimizer, num_warmup_steps=10, num_training_steps=100,
                                                               min_lr_rate=rate).lr_lambdas[0]
        factors = [lr_factor(step, warmup_steps=10, steps=100, min_lr_rate=rate) for step in range(101)]
        assert factors[:10] == pytest.approx([(step + 1) / 10 for step in range(10)])  # no step at lr 0
        assert factors[10:] == pytest.approx([reference(step) for step in range(10, 101)])
        assert factors[-1] == pytest.approx(rate)


def test_checkpoint_selection_ignores_half_written_saves(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    for name in ("step-000004", "step-000008", ".tmp-step-000012", "step-000016"):
        (checkpoints / name).mkdir(parents=True)
    for name in ("step-000004", "step-000008"):
        (checkpoints / name / "trainer_state.json").write_text("{}")
    assert latest_checkpoint(checkpoints).name == "step-000008"  # step-000016 lacks its state: not complete


CHURN_SCRIPT = """
import resource, torch
from core.trainer import keep_freed_memory
keep_freed_memory()
def step():  # like a training step: activations allocated, then all freed
    activations = [torch.ones(2 << 20) for _ in range(16)]  # 8 MiB each
    del activations
for _ in range(10):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 10)
"""


def test_precision_auto_trains_in_bf16_only_where_the_cpu_multiplies_it_natively(shards, run_module, tmp_path):
    recipe = tiny_recipe(tmp_path / "recipe.yaml", shards, tmp_path / "run", steps=2, checkpoint_every=2,
                         precision="auto")
    result = run_module("pretrain", str(recipe), env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    expected = "bf16" if cpu_has_bf16() else "fp32"  # emulated bf16 is ~20x slower than fp32
    assert f"train.precision=auto: {expected} on cpu" in result.stdout
    assert "pretrained 2 steps" in result.stdout
    assert [resolve_precision(name, torch.device("cpu")) for name in ("fp32", "bf16")] == ["fp32", "bf16"]


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
                    reason="a glibc setting")
def test_cpu_training_keeps_freed_memory_instead_of_faulting_it_back_in_every_step():
    # Without keep_freed_memory glibc returns the 128 MiB after most such steps (in 5 of 6 fresh processes here)
    # and the next step faults all 32k pages back in.
    run = subprocess.run([PYTHON, "-c", CHURN_SCRIPT], capture_output=True, text=True, check=True, cwd=ROOT)
    assert int(run.stdout) < 100


def test_shipped_recipes_load_and_name_unknown_keys(tmp_path):
    for path in sorted((ROOT / "recipes" / "pretrain").glob("*.yaml")):
        recipe = load_recipe(path, [], PretrainRecipe)
        assert recipe.objectives.enabled(), path
        assert recipe.output_dir and recipe.data.train
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stepz: 3\n")
    with pytest.raises(UserError, match="train.stepz"):
        load_recipe(bad, [], PretrainRecipe)


def test_recipe_mistakes_stop_with_one_line_naming_the_file(shards, tmp_path, monkeypatch):
    from pretrain.train import main

    recipe = tiny_recipe(tmp_path / "recipe.yaml", shards, tmp_path / "run")
    with pytest.raises(UserError, match=r"recipe.yaml: tracking: unknown tracker 'mlflow'"):
        main([str(recipe), "tracking=mlflow"])
    with pytest.raises(UserError, match=r"recipe.yaml: no objective enabled"):
        main([str(recipe), "objectives.mae.weight=0", "objectives.teacher.weight=0", "objectives.electra.weight=0",
              "objectives.metric.weight=0"])
    with pytest.raises(UserError, match=r"recipe.yaml: probe needs both train and val"):
        main([str(recipe), f"probe.train={shards[0]}"])
    with pytest.raises(UserError, match=r"recipe.yaml: model: unknown backbone size 'huge'"):
        main([str(recipe), "model.size=huge"])
    with pytest.raises(UserError, match=r"recipe.yaml: train.ema_decay=0.99: pretraining exports its weights as "
                                        r"trained .*; the moving average is for fine-tuning, set train.ema_decay=0"):
        main([str(recipe), "train.ema_decay=0.99"])
    with pytest.raises(UserError, match=r"recipe.yaml: .*ema_decay must be in \[0, 1\)"):
        main([str(recipe), "train.ema_decay=1.0"])
    with pytest.raises(UserError, match=r"recipe.yaml: .*min_lr_rate is the fraction of lr the cosine ends at"):
        main([str(recipe), "train.min_lr_rate=2"])
    with pytest.raises(UserError, match="no such shard"):
        main([str(recipe), f"data.train=[{tmp_path / 'missing'}]"])
    monkeypatch.setenv("PATH", str(tmp_path))  # no C++ compiler on it
    with pytest.raises(UserError, match=r"train.compile=true: torch.compile builds C\+\+ kernels on CPUs and no C\+\+ "
                                        r"compiler was found \(g\+\+, c\+\+, clang\+\+\); install one"):
        main([str(recipe), "train.compile=true"])


def test_pretraining_goes_on_from_a_saved_backbone_with_new_objective_heads(shards, tmp_path):
    from pretrain.hub import load_backbone
    from pretrain.train import run

    first = tiny_recipe(tmp_path / "first.yaml", shards, tmp_path / "first", steps=2, checkpoint_every=2)
    run(load_recipe(first, [], PretrainRecipe), source=str(first))
    saved = tmp_path / "first" / "backbone"
    unshaped = ["model.hidden_size=null", "model.num_layers=null", "model.num_heads=null",
                "model.intermediate_size=null"]
    with pytest.raises(UserError, match=r"recipe.yaml: model.hidden_size, model.num_layers, model.num_heads, "
                                        r"model.intermediate_size shape a backbone trained from scratch, but "
                                        rf"backbone={saved} is given; drop one of the two \(override "
                                        r"model.hidden_size=null model.num_layers=null"):
        load_and_run = tiny_recipe(tmp_path / "recipe.yaml", shards, tmp_path / "on")
        run(load_recipe(load_and_run, [f"backbone={saved}"], PretrainRecipe), source=str(load_and_run))
    with pytest.raises(UserError, match=r"recipe.yaml: the backbone expects 16000 Hz audio but data.sample_rate is "
                                        r"22050; set data.sample_rate to match"):
        run(load_recipe(load_and_run, [f"backbone={saved}", "data.sample_rate=22050", *unshaped], PretrainRecipe),
            source=str(load_and_run))

    # lr 0: the two steps move nothing, so the export is the saved backbone, and the EMA teacher started from it too
    still, _ = run(load_recipe(load_and_run, [f"backbone={saved}", "train.lr=0", "train.steps=2",
                                              "train.checkpoint_every=2", *unshaped], PretrainRecipe),
                   source=str(load_and_run))
    before = load_backbone(saved).state_dict()
    for module in (load_backbone(tmp_path / "on" / "backbone"), still.teacher):
        after = module.state_dict()
        assert after.keys() == before.keys()
        assert all(torch.equal(after[name], before[name]) for name in before)
    assert f"Initialised from\n\n{saved}" in (tmp_path / "on" / "backbone" / "README.md").read_text()

    moved, state = run(load_recipe(load_and_run, [f"backbone={saved}", f"output_dir={tmp_path / 'moved'}",
                                                  "train.steps=2", "train.checkpoint_every=2", *unshaped],
                                   PretrainRecipe), source=str(load_and_run))
    assert state["step"] == 2 and all(torch.isfinite(torch.tensor(value)) for value in state["logs"].values())
    assert any(not torch.equal(tensor, before[name]) for name, tensor in moved.backbone.state_dict().items())
