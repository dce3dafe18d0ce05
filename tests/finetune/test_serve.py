"""The HTTP server as users meet it: a real `python -m finetune serve` process on a loopback port, real HTTP
requests, the bad-input zoo, concurrent clients, and the page driven by a real headless Chromium."""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
import torch

from core.trainer import cpu_has_bf16
from finetune.folder import load_model, save_model
from finetune.predict import predict
from finetune.train import FinetuneRecipe, build_classifier, model_info
from pretrain.backbone import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
RATE = 16000
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wav(seconds: float, *, rate: int = RATE, seed: int = 0) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    tone = 0.2 * np.sin(2 * np.pi * (220 + 40 * seed) * t) * (1 + 0.3 * np.sin(2 * np.pi * 3 * t))
    buffer = io.BytesIO()
    sf.write(buffer, tone.astype(np.float32), rate, format="WAV")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A cpu-2 classifier with 1 s windows, saved as fine-tuning saves it (serving needs no training)."""
    torch.manual_seed(0)
    recipe = FinetuneRecipe(model=ModelConfig(size="cpu-2"))
    recipe.data.clip_seconds = 1.0
    recipe.eval.hop_seconds = 0.5
    return save_model(build_classifier(recipe).eval(), tmp_path_factory.mktemp("served") / "model", model_info(recipe))


@contextlib.contextmanager
def serving(model_dir: Path, *options: str) -> Iterator[str]:
    """`python -m finetune serve MODEL OPTIONS` on a free loopback port, answering /health; yields its URL. On the
    way out the server is stopped and must have said where it listened (loopback by default)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "finetune", "serve", str(model_dir), "--port", str(port),
                                *options], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert process.poll() is None, process.stdout.read()
        yield url
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert f"on http://127.0.0.1:{port}/" in output  # bound to loopback by default


@pytest.fixture(scope="module")
def server(model_dir) -> Iterator[str]:
    with serving(model_dir, "--max-seconds", "20", "--max-bytes", "2000000") as url:
        yield url


def test_precision_auto_serves_what_the_cpu_multiplies_natively(model_dir):
    with serving(model_dir, "--precision", "auto", "--threads", "1") as url:
        assert httpx.get(f"{url}/model").json()["precision"] == ("bf16" if cpu_has_bf16() else "fp32")


def test_health_model_and_docs(server, model_dir):
    assert httpx.get(f"{server}/health").json()["status"] == "ok"
    about = httpx.get(f"{server}/model").json()
    thresholds = json.loads((model_dir / "thresholds.json").read_text())
    assert about["labels"] == list(thresholds) and about["thresholds"] == thresholds
    assert about["clip_seconds"] == 1.0 and about["timbre_version"] and about["precision"] == "fp32"
    assert "/predict" in httpx.get(f"{server}/openapi.json").json()["paths"]
    assert "swagger" in httpx.get(f"{server}/docs").text.lower()


def test_predict_answers_like_the_command_line(server, model_dir, tmp_path):
    files = {name: wav(seconds, seed=k) for k, (name, seconds) in enumerate([("a.wav", 3.0), ("b.wav", 0.6)])}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    response = httpx.post(f"{server}/predict", params={"timeline": "true"},
                          files=[("files", (name, data, "audio/wav")) for name, data in files.items()])
    assert response.status_code == 200, response.text
    answer = response.json()
    local = list(predict(load_model(model_dir, device="cpu"), [str(tmp_path / name) for name in files], timeline=True))
    assert [r["file"] for r in answer["results"]] == list(files)
    for served, expected in zip(answer["results"], local):
        assert served["instruments"] == expected["instruments"] and served["windows"] == expected["windows"]
        assert len(served["timeline"]) == served["windows"]
        np.testing.assert_allclose(list(served["probabilities"].values()), list(expected["probabilities"].values()),
                                   atol=1e-5)


BAD = {
    "empty upload": (("e.wav", b"", "audio/wav"), 422, "e.wav: empty upload"),
    "text named .wav": (("t.wav", b"<html>not audio</html>\n" * 40, "audio/wav"), 422, "t.wav: not decodable audio"),
    "truncated file": (("cut.wav", wav(3.0)[:3000], "audio/wav"), 422, "cut.wav: truncated"),
    "unsupported format": (("x.mid", b"MThd\x00\x00\x00\x06" + bytes(40), "audio/midi"), 422, "x.mid: not decodable"),
    "wrong content type": (("a.wav", wav(1.0), "text/plain"), 415, "content type text/plain is not audio"),
    "over max seconds": (("long.wav", wav(25.0, rate=8000), "audio/wav"), 413, "over the server's limit of 20 s"),
    "over max bytes": (("big.wav", wav(70.0, rate=16000), "audio/wav"), 413, "over the server's limit of 2000000"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_a_4xx_with_one_line_and_the_server_carries_on(server, case):
    upload, status, message = BAD[case]
    response = httpx.post(f"{server}/predict", files=[("files", upload)])
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert "\n" not in error and message in error, error
    assert httpx.get(f"{server}/health").status_code == 200


def test_a_missing_field_is_one_line(server):
    for response in (httpx.post(f"{server}/predict"),
                     httpx.post(f"{server}/predict", files=[("wrong", ("a.wav", wav(1.0), "audio/wav"))])):
        assert response.status_code == 422 and "multipart field `files`" in response.json()["error"]


def test_sixteen_concurrent_requests_are_answered_correctly_and_share_forwards(server):
    uploads = [wav(1.0 + 0.25 * (k % 4), seed=k) for k in range(16)]
    alone = [httpx.post(f"{server}/predict", files=[("files", (f"{k}.wav", data, "audio/wav"))]).json()
             for k, data in enumerate(uploads)]
    before = httpx.get(f"{server}/health").json()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda item: httpx.post(
            f"{server}/predict", files=[("files", (f"{item[0]}.wav", item[1], "audio/wav"))], timeout=60).json(),
            enumerate(uploads)))
    after = httpx.get(f"{server}/health").json()
    for one, many in zip(alone, together):
        np.testing.assert_allclose(list(one["results"][0]["probabilities"].values()),
                                   list(many["results"][0]["probabilities"].values()), atol=1e-5)
    assert after["files"] - before["files"] == 16
    assert after["forwards"] - before["forwards"] < 16  # concurrent requests went through the model together


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium: `make system-deps` installs it")
def test_the_page_in_a_real_headless_browser(server, tmp_path):
    common = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=15000",
              "--window-size=1000,800", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*common, "--dump-dom", f"{server}/?try=tone"], capture_output=True, text=True,
                         timeout=120).stdout
    assert 'data-state="done"' in dom and "tone.wav" in dom
    assert dom.count("data-code=") == 11  # every instrument listed with its probability
    shot = tmp_path / "page.png"
    subprocess.run([*common, f"--screenshot={shot}", f"{server}/?try=tone"], capture_output=True, timeout=120)
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (800, 1000)
    blue = (pixels[..., 2] > 0.6) & (pixels[..., 0] < 0.5)  # the probability bars and timeline cells
    assert blue.sum() > 500
