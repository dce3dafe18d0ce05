"""`python -m finetune serve MODEL`: a fine-tuned model behind HTTP (FastAPI + uvicorn), with a page to try it.

    POST /predict     one or more uploaded audio files (multipart field `files`) -> {"model", "thresholds",
                      "results": [one `finetune predict` answer per file]}; `?timeline=true` adds each window
    GET  /health      {"status": "ok", "files": answered so far, "forwards": model passes that answered them}
    GET  /model       labels, thresholds, clip length, hop, validation metrics, Timbre version
    GET  /docs        OpenAPI documentation
    GET  /            a page: drop an audio file, see its instruments and a timeline

The model is loaded once. Uploads are decoded in worker threads; their windows are queued for one inference
thread that takes whatever is waiting (up to `--batch-size` windows, waiting `--wait-ms` for more) and runs it
through the model together, so concurrent requests share forward passes (micro-batching) and torch's threads are
never split between two forwards. `--no-batching` gives every request its own forward, one at a time (the naive
server bench/serve.py compares against).

Bad input gets a 4xx answer `{"error": "one line"}` and the server carries on: a missing field, an empty upload,
a file over `--max-bytes` or `--max-seconds`, a content type that is not audio, bytes no decoder takes.
"""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import soundfile as sf
import torch
from fastapi import FastAPI, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from core.errors import ArgumentParser, UserError, positive_float, positive_int, timbre_version
from core.trainer import PRECISION_CHOICES
from finetune.folder import FinetunedModel, load_model
from finetune.inference import FileResult, infer
from finetune.predict import describe
from pretrain.encoder import window_starts
from shards.audio import BadAudio
from shards.inputs import read_mono

PAGE = Path(__file__).with_name("serve.html")
UPLOAD_TYPES = ("audio/", "application/octet-stream", "video/ogg")  # what browsers and curl send for audio files


class BadRequest(Exception):
    """A request the server refuses with `status` and a one-line reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Limits:
    max_bytes: int = 50 * 1024 * 1024
    max_seconds: float = 600.0
    max_files: int = 16


@dataclass
class _Job:
    audio: torch.Tensor
    future: asyncio.Future
    windows: int


@dataclass
class MicroBatcher:
    """One inference thread; queued files are run through the model together (or one by one without batching)."""

    model: FinetunedModel
    batch_size: int = 32
    wait_ms: float = 5.0
    batching: bool = True
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    executor: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="infer"))
    files: int = 0  # files answered
    forwards: int = 0  # model passes that answered them

    async def submit(self, audio: torch.Tensor) -> FileResult:
        future = asyncio.get_running_loop().create_future()
        windows = len(window_starts(audio.shape[-1], self.model.window, self.model.hop(None)))
        await self.queue.put(_Job(audio=audio, future=future, windows=windows))
        return await future

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self.queue.get()]
            if self.batching:
                deadline = loop.time() + self.wait_ms / 1000
                while sum(job.windows for job in jobs) < self.batch_size:
                    try:
                        jobs.append(await asyncio.wait_for(self.queue.get(), max(0.0, deadline - loop.time())))
                    except TimeoutError:
                        break
            try:
                results = await loop.run_in_executor(self.executor, self._forward, [job.audio for job in jobs])
            except Exception as error:  # noqa: BLE001 - every waiting request gets the failure, the loop goes on
                for job in jobs:
                    job.future.set_exception(error)
                continue
            for job, result in zip(jobs, results):
                job.future.set_result(result)

    def _forward(self, audios: list[torch.Tensor]) -> list[FileResult]:
        self.forwards += 1
        self.files += len(audios)
        return [result for _, result in infer(self.model, enumerate(audios), batch_size=self.batch_size)]


def decode(data: bytes, name: str, model: FinetunedModel, limits: Limits) -> torch.Tensor:
    """Uploaded bytes -> mono audio at the model's rate, with the checks of `shards.audio` and the size limits."""
    suffix = Path(name).suffix.lower() if Path(name).suffix else ".audio"
    with tempfile.NamedTemporaryFile(suffix=suffix) as handle:
        handle.write(data)
        handle.flush()
        try:
            info = sf.info(handle.name)
            if info.duration > limits.max_seconds:
                raise BadRequest(413, f"{name}: {info.duration:.1f} s of audio, over the server's limit of "
                                      f"{limits.max_seconds:g} s; send a shorter file")
        except (sf.LibsndfileError, RuntimeError):
            pass  # read_mono below names what is wrong with it
        try:
            return read_mono(handle.name, model.info.sample_rate)
        except BadAudio as error:
            raise BadRequest(422, f"{name}: {error}") from None


def create_app(model: FinetunedModel, *, limits: Limits = Limits(), batch_size: int = 32, wait_ms: float = 5.0,
               batching: bool = True) -> FastAPI:
    batcher = MicroBatcher(model=model, batch_size=batch_size, wait_ms=wait_ms, batching=batching)
    tasks: list[asyncio.Task] = []

    async def lifespan(app: FastAPI):
        tasks.append(asyncio.create_task(batcher.run()))
        yield
        tasks[0].cancel()
        batcher.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="Timbre instrument recognition", version=timbre_version(), lifespan=lifespan,
                  description="Musical-instrument recognition with a Timbre fine-tuned model.")
    app.state.batcher = batcher
    labels = model.info.labels

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, error: BadRequest) -> JSONResponse:
        return JSONResponse({"error": str(error)}, status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or "request"
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid')}; send audio files in the multipart "
                                      "field `files`"}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(error.detail)}, status_code=error.status_code)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return PAGE.read_text()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "files": batcher.files, "forwards": batcher.forwards}

    @app.get("/model")
    async def about() -> dict:
        info = model.info
        return {"labels": labels, "thresholds": dict(zip(labels, info.thresholds)), "clip_seconds": info.clip_seconds,
                "hop_seconds": info.hop_seconds, "sample_rate": info.sample_rate, "aggregate": info.aggregate,
                "validation": info.validation, "head": info.head.kind, "adapt": info.adapt.mode,
                "timbre_version": timbre_version(), "model": model.path, "precision": model.precision,
                "batching": batching,
                "limits": {"max_bytes": limits.max_bytes, "max_seconds": limits.max_seconds,
                           "max_files": limits.max_files}}

    @app.post("/predict")
    async def predict(files: list[UploadFile], timeline: bool = False) -> dict:
        """Instruments in each uploaded file (wav, flac, ogg, mp3, aiff, ...), batched through the model together."""
        if len(files) > limits.max_files:
            raise BadRequest(413, f"{len(files)} files in one request, over the limit of {limits.max_files}")
        audios = []
        for upload in files:
            name = upload.filename or "upload"
            kind = (upload.content_type or "application/octet-stream").split(";")[0].strip().lower()
            if not kind.startswith(UPLOAD_TYPES):
                raise BadRequest(415, f"{name}: content type {kind} is not audio; send audio/* or "
                                      "application/octet-stream")
            data = await upload.read(limits.max_bytes + 1)
            if not data:
                raise BadRequest(422, f"{name}: empty upload (0 bytes)")
            if len(data) > limits.max_bytes:
                raise BadRequest(413, f"{name}: over the server's limit of {limits.max_bytes} bytes")
            audios.append((name, await run_in_threadpool(decode, data, name, model, limits)))
        started = time.perf_counter()
        results = await asyncio.gather(*(batcher.submit(audio) for _, audio in audios))
        answers = [describe(model, name, result, aggregate=model.info.aggregate, timeline=timeline)
                   for (name, _), result in zip(audios, results)]
        return {"model": model.path, "thresholds": dict(zip(labels, model.info.thresholds)), "results": answers,
                "seconds": round(time.perf_counter() - started, 4)}

    return app


def main(argv: list[str]) -> int:
    """Serve a fine-tuned model over HTTP."""
    parser = ArgumentParser(prog="python -m finetune serve", description=main.__doc__)
    parser.add_argument("model", help="model folder (<output_dir>/model of a fine-tuning run)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=positive_int, default=8000, help="port (default 8000)")
    parser.add_argument("--precision", choices=PRECISION_CHOICES, default="fp32",
                        help="inference precision; auto: bf16 where the device multiplies it natively, else fp32")
    parser.add_argument("--max-seconds", type=positive_float, default=Limits.max_seconds,
                        help=f"longest audio accepted (default {Limits.max_seconds:g} s)")
    parser.add_argument("--max-bytes", type=positive_int, default=Limits.max_bytes,
                        help=f"largest upload accepted (default {Limits.max_bytes} bytes)")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="windows per forward pass (default 32)")
    parser.add_argument("--wait-ms", type=float, default=5.0, help="how long a forward waits for more requests")
    parser.add_argument("--no-batching", action="store_true", help="one forward per request (for comparison)")
    parser.add_argument("--threads", type=positive_int, default=os.cpu_count() or 1,
                        help="torch threads for inference (default: all cores)")
    args = parser.parse_args(argv)
    import uvicorn

    with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET) as probe:
        try:
            probe.bind((args.host, args.port))
        except OSError as error:
            raise UserError(f"{args.host}:{args.port}: cannot listen there ({error.strerror or error}); pick another "
                            "--port or --host") from None
    torch.set_num_threads(args.threads)
    model = load_model(args.model, precision=args.precision)
    app = create_app(model, limits=Limits(max_bytes=args.max_bytes, max_seconds=args.max_seconds),
                     batch_size=args.batch_size, wait_ms=args.wait_ms, batching=not args.no_batching)
    print(f"serving {args.model} on http://{args.host}:{args.port}/ (API docs at /docs)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0

