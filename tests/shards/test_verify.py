"""verify names damaged shards and fails; stats tabulates and plots what the manifest holds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from core.errors import UserError, run_cli
from shards.__main__ import main
from shards.format import MANIFEST
from shards.pack import PackOptions, pack
from shards.verify import load_manifest, plot_classes, stats_table, verify


@pytest.fixture(scope="module")
def packed(irmas, tmp_path_factory):
    base = tmp_path_factory.mktemp("verify")
    tree = irmas.test(base / "in", seconds=0.5)
    pack(tree.root, base / "out", options=PackOptions(source="irmas-test", shard_size=4),
         progress=False, print_fn=lambda *_: None)
    return base / "out"


def run_verify(outdir: Path) -> tuple[int, list[str]]:
    lines: list[str] = []
    return verify(outdir, print_fn=lines.append), lines


def test_a_whole_pack_verifies(packed):
    status, lines = run_verify(packed)
    assert status == 0
    assert lines[:4] == [f"test/shard-00000{i}.tar: ok" for i in range(4)]
    assert lines[-1].startswith("verify: 4 shard(s), 16 samples")


def test_a_truncated_shard_is_named_and_fails(packed, tmp_path, capsys):
    outdir = tmp_path / "out"
    shutil.copytree(packed, outdir)
    victim = outdir / "test" / "shard-000002.tar"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
    (outdir / "test" / "shard-000004.tar.tmp").write_bytes(b"partial")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(["verify", str(outdir)]))
    assert exit_info.value.code == 1
    stdout = capsys.readouterr().out
    bad = [line for line in stdout.splitlines() if "BAD" in line]
    assert bad[0].startswith("test/shard-000002.tar: BAD:") and "truncated" in bad[0]
    assert "decodable samples" in bad[0]
    assert bad[1] == "test/shard-000004.tar.tmp: BAD: partial shard of an unfinished pack"
    assert "test/shard-000001.tar: ok" in stdout


def test_an_altered_sample_is_found_by_checksum_and_decode(packed, tmp_path):
    outdir = tmp_path / "out"
    shutil.copytree(packed, outdir)
    victim = outdir / "test" / "shard-000001.tar"
    data = bytearray(victim.read_bytes())
    start = data.index(b"fLaC")
    data[start + 200 : start + 1200] = bytes(1000)  # zero a stretch of FLAC frames, same size
    victim.write_bytes(bytes(data))
    status, lines = run_verify(outdir)
    assert status == 1
    assert lines[1].startswith("test/shard-000001.tar: BAD: sha256 does not match")
    (outdir / "test" / "shard-000003.tar").unlink()
    status, lines = run_verify(outdir)
    assert "test/shard-000003.tar: BAD: missing" in lines


def test_stats_table_and_plot(packed, tmp_path, capsys):
    manifest = load_manifest(packed)
    table = stats_table(manifest)
    assert table.splitlines()[0].startswith("irmas-test: 16 inputs, 16 packed, 0 skipped, 16 samples")
    rows = {line.split("  ")[0].strip(): line.split() for line in table.splitlines()}
    assert rows["pia piano"][2] == str(manifest["instruments"]["pia"])
    assert rows["total"][1] == "16"
    png = plot_classes(manifest, tmp_path / "plots" / "classes.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stats_cli_and_missing_manifest(packed, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(["stats", str(packed), "--plot", str(tmp_path / "c.png")]))
    assert exit_info.value.code == 0 and (tmp_path / "c.png").is_file()
    assert "[instruments]" in capsys.readouterr().out
    with pytest.raises(UserError, match=f"{MANIFEST}: not found"):
        load_manifest(tmp_path)


def test_a_copied_shard_repeats_keys(packed, tmp_path):
    outdir = tmp_path / "out"
    shutil.copytree(packed, outdir)
    manifest = load_manifest(outdir)
    first = manifest["shards"][0]
    shutil.copy(outdir / first["path"], outdir / "test" / "shard-000009.tar")
    manifest["shards"].append({**first, "path": "test/shard-000009.tar"})
    (outdir / MANIFEST).write_text(json.dumps(manifest))
    status, lines = run_verify(outdir)
    assert status == 1
    assert any(line.startswith("test/shard-000009.tar: BAD: 4 key(s) also in an earlier shard") for line in lines)


def test_not_a_manifest_is_a_user_error(tmp_path):
    (tmp_path / MANIFEST).write_text('{"hello": 1}')
    with pytest.raises(UserError, match="not a Timbre shards manifest"):
        load_manifest(tmp_path)


@pytest.mark.parametrize("outside", ["../../../etc/hostname", "/etc/passwd"])
def test_a_shard_path_outside_outdir_is_refused_unread(packed, tmp_path, capsys, outside):
    outdir = tmp_path / "out"
    shutil.copytree(packed, outdir)
    manifest = load_manifest(outdir)
    manifest["shards"][1]["path"] = outside
    (outdir / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(["verify", str(outdir)]))
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and f"shard path {outside!r} points outside" in captured.err
    assert "test/shard-000000.tar" not in captured.out  # refused before any shard is hashed


@pytest.mark.parametrize("command", ["verify", "stats"])
@pytest.mark.parametrize("damage, message", [
    (lambda m: m["splits"]["test"].pop("samples"), "split 'test' lacks the field 'samples'"),
    (lambda m: m["splits"]["test"].pop("instruments"), "split 'test' lacks the field 'instruments'"),
    (lambda m: m["shards"][0].pop("sha256"), "shards[0] lacks the field 'sha256'"),
    (lambda m: m.__setitem__("shards", {}), "the manifest field 'shards' has the wrong type"),
])
def test_a_manifest_missing_fields_is_one_line(packed, tmp_path, capsys, command, damage, message):
    outdir = tmp_path / "out"
    shutil.copytree(packed, outdir)
    manifest = load_manifest(outdir)
    damage(manifest)
    (outdir / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main([command, str(outdir)]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(outdir / MANIFEST) in err and message in err
