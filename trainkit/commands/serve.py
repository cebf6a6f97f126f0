"""`trainkit serve RUN_DIR`: a run's model on a web page and behind an HTTP API.

FastAPI + uvicorn (the `serve` extra), imported only when the command runs. The model is loaded
once (`load_run`, weights_only) and every image goes through the same two steps as `trainkit
predict` and the exported ONNX model: `preprocess.prepare_image` (convert and resize; digits framed
as MNIST's for a run on them) and `TrainedModel.preprocess` (normalize). /docs (Swagger UI) and
/redoc are served from the fastapi-offline package's files, so they work offline; the OpenAPI
document is made from the answers' own models (serve_schema.py). Requests that arrive while the
model is busy are batched into its next forward (`Batcher`). Bad input is a 4xx answer with one
line in "detail".
"""

import asyncio
import csv
import importlib.util
import os
import socket
import sys
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ..errors import TrainkitError

MAX_UPLOAD_MB = 10          # a request body above this is refused (413) before it is decoded
MAX_PIXELS = 4096 * 4096    # an image above this is refused from its header, before decoding (413)
INLINE_DECODE = 256 << 10   # bodies up to this are decoded on the event loop; larger ones in a thread
RUN_IMAGES = ("plot.png", "confusion.png")   # the run's reports shown on the page


class Refused(Exception):
    """Bad input from a client: an HTTP status and one line."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Predictor:
    """Class probabilities of uint8 images (N, C, H, W): PyTorch, or ONNX Runtime on the model
    that `trainkit export` writes. Both take `TrainedModel.preprocess`'s output."""

    def __init__(self, trained, backend: str = "torch", threads: int = 1):
        self.trained, self.backend = trained, backend
        torch.set_num_threads(threads)
        self.channels_last = backend == "torch" and self.try_channels_last()
        if backend == "onnx":
            if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
                raise TrainkitError("--backend onnx needs onnx and onnxruntime: pip install trainkit[onnx]")
            import onnxruntime

            from .inference import export
            with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)   # torch's notes on its exporters
                path = export(trained, "onnx", Path(tmp) / "model.onnx")
                options = onnxruntime.SessionOptions()
                options.intra_op_num_threads = options.inter_op_num_threads = threads
                self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def try_channels_last(self) -> bool:
        """PyTorch's CPU convolutions run faster on channels-last tensors (S5Net, one thread: 1.35x);
        the model is switched only if it gives the same probabilities that way."""
        c, h, w = self.trained.image_shape
        probe = torch.randint(0, 256, (3, c, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        try:
            expected = self.trained.probabilities(probe)
            self.trained.model.to(memory_format=torch.channels_last)
            got = self.trained.probabilities(probe.contiguous(memory_format=torch.channels_last))
            if torch.allclose(got, expected, atol=1e-5):
                return True
        except Exception:  # noqa: BLE001 - a model that cannot run is reported by create_app's own check
            pass
        self.trained.model.to(memory_format=torch.contiguous_format)
        return False

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        if self.backend == "torch":
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)     # (N, C, H, W), NHWC in memory
            return self.trained.probabilities(images).numpy()
        (out,) = self.session.run(None, {"images": self.trained.preprocess(images).numpy()})
        out = out - out.max(axis=1, keepdims=True)     # log-probabilities or logits: softmax either way
        e = np.exp(out)
        return e / e.sum(axis=1, keepdims=True)


class Batcher:
    """Forwards of queued images, each in a thread of its own, at most `workers` at once. Images
    that arrive while every worker is busy wait in a queue, and the next free worker takes them all
    (up to `max_batch`): one client alone waits for nothing, 32 clients share forwards.
    `max_batch=1` is one forward per request."""

    def __init__(self, predict, max_batch: int = 16, workers: int = 1):
        self.predict, self.max_batch, self.workers = predict, max_batch, workers
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix="trainkit-model")
        self.queue: asyncio.Queue | None = None

    def forward(self, images: list[torch.Tensor]) -> np.ndarray:
        return self.predict(torch.stack(images))       # (N, C, H, W) -> (N, classes); in the worker's thread

    async def run(self) -> None:
        self.queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        free = asyncio.Semaphore(self.workers)
        while True:
            await free.acquire()        # a worker first, then the batch: it takes what queued meanwhile
            items = [await self.queue.get()]
            while len(items) < self.max_batch and not self.queue.empty():
                items.append(self.queue.get_nowait())
            done = loop.run_in_executor(self.executor, self.forward, [image for image, _ in items])

            def finished(done, items=items):
                free.release()
                self.answer(items, done)
            done.add_done_callback(finished)

    @staticmethod
    def answer(items: list, done: asyncio.Future) -> None:
        """Each waiting request gets its row, or the forward's exception (a 500 there)."""
        for i, (_, future) in enumerate(items):
            if future.done():           # a client that went away has cancelled its future
                continue
            if done.exception() is not None:
                future.set_exception(done.exception())
            else:
                future.set_result(done.result()[i])

    async def __call__(self, image: torch.Tensor) -> np.ndarray:
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((image, future))
        return await future


def run_summary(run_dir: Path, trained) -> dict:
    """What /info and the page say about the run: model, dataset, classes, accuracy, preprocessing."""
    from ..run.reports import epochs_trained
    from .compare import images_per_epoch
    from .inference import preprocessing

    rows = []
    if (run_dir / "metrics.csv").is_file():
        try:
            with open(run_dir / "metrics.csv", newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("epoch")]
        except (OSError, csv.Error, UnicodeDecodeError):
            rows = []
    accuracy, epochs, stopped = None, 0.0, False
    if rows:
        try:
            last = rows[-1]
            accuracy = float(last["test_acc"]) if last.get("test_acc") else None
            epochs = epochs_trained(int(last["epoch"]), int(last.get("train_seen") or 0), images_per_epoch(run_dir))
            stopped = epochs < int(last["epoch"])
        except ValueError:
            pass
    return {"run": str(run_dir), "model": trained.cfg.model, "dataset": trained.cfg.dataset,
            "classes": trained.classes, "accuracy": accuracy, "epochs": epochs, "stopped": stopped,
            "parameters": sum(p.numel() for p in trained.model.parameters()),
            "reports": [name for name in RUN_IMAGES if (run_dir / name).is_file()],
            "preprocessing": preprocessing(trained)}


async def read_body(request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to pass `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise Refused(413, f"the upload is {int(declared):,} bytes; the limit is {limit:,} bytes")
    from starlette.requests import ClientDisconnect

    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise Refused(413, f"the upload is over the limit of {limit:,} bytes")
    except ClientDisconnect:
        # A client that hangs up mid-upload is no fault of the server: one line in its log, where
        # uvicorn would print a 30-line traceback; the answer goes nowhere.
        client = f"{request.client.host}:{request.client.port}" if request.client else "a client"
        of = f" of {int(declared):,}" if declared.isdigit() else ""
        print(f"trainkit serve: {client} hung up after {len(body):,}{of} bytes of its upload; its request was "
              f"dropped", file=sys.stderr, flush=True)
        raise Refused(400, "the client disconnected before the upload ended") from None
    return bytes(body)


async def image_bytes(request, limit: int) -> tuple[bytes, str]:
    """The uploaded image's bytes and name: a multipart form's file, or a raw image/* body."""
    from starlette.datastructures import UploadFile
    from starlette.requests import Request

    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "multipart/form-data" and not kind.startswith("image/") and kind != "application/octet-stream":
        raise Refused(415, f"content type {kind or '(none)'} is not accepted: send multipart/form-data with "
                           f"a file, or the image itself as image/png or image/jpeg")
    body = await read_body(request, limit)
    if not body:
        raise Refused(400, "the request body is empty: send an image")
    if kind != "multipart/form-data":
        return body, "the upload"

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    form = await Request(request.scope, receive).form(max_files=1, max_fields=16)
    files = [v for v in form.values() if isinstance(v, UploadFile)]
    if not files:
        raise Refused(400, "the form holds no file: send the image as a file field (file=@digit.png)")
    data = await files[0].read()
    if not data:
        raise Refused(400, f"the uploaded file {files[0].filename or ''} is empty".replace("  ", " "))
    return data, f"the upload {files[0].filename}" if files[0].filename else "the upload"


def default_threads() -> int:
    """The model's threads: all cores but one, which the event loop (HTTP, decoding) needs."""
    return max(1, len(os.sched_getaffinity(0)) - 1)


def load_served_model(run_dir: Path, backend: str, threads: int | None):
    """The run's model behind a Predictor, tried on an image of its own shape (a model that cannot
    run is refused before serving). Returns (the loaded run, the predictor, the backend chosen)."""
    from .inference import load_run

    if not run_dir.is_dir():
        raise TrainkitError(f"{run_dir} does not exist or is not a folder: give a run directory (runs/...)")
    trained = load_run(run_dir)
    if backend == "auto":
        backend = "onnx" if all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime")) else "torch"
    predictor = Predictor(trained, backend, threads or default_threads())
    try:
        predictor(torch.zeros(1, *trained.image_shape, dtype=torch.uint8))
    except Exception as exc:  # noqa: BLE001 - any failure of the model is the run's fault
        raise TrainkitError(f"{run_dir}'s model fails on an image of its own shape: {exc}".splitlines()[0]) from None
    return trained, predictor, backend


def create_app(run_dir: str | Path, *, backend: str = "auto", max_batch: int = 16, threads: int | None = None,
               workers: int = 1,
               max_upload: int = MAX_UPLOAD_MB << 20, max_pixels: int = MAX_PIXELS):
    """The FastAPI app serving a run; its model is loaded here, so a bad run fails before serving."""
    from contextlib import asynccontextmanager

    from fastapi_offline import FastAPIOffline

    from ..data.preprocess import reads_digits
    from .serve_schema import Info

    run_dir = Path(run_dir)
    trained, predictor, backend = load_served_model(run_dir, backend, threads)
    info = Info(**run_summary(run_dir, trained), backend=backend, max_batch=max_batch, workers=workers,
                threads=torch.get_num_threads() if backend == "torch" else threads or default_threads(),
                max_upload_bytes=max_upload, max_pixels=max_pixels,
                digits=reads_digits(trained.cfg.dataset, trained.image_shape))   # images are framed like MNIST's
    batcher = Batcher(predictor, max_batch, workers)

    @asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()
        batcher.executor.shutdown(wait=False)

    # /docs (Swagger UI) from the package's own copy of its script: no CDN, works offline; /redoc below
    app = FastAPIOffline(title="trainkit serve", lifespan=lifespan, redoc_url=None, favicon_url="/favicon.svg",
                         description=f"The model of {run_dir} ({trained.cfg.model} on {trained.cfg.dataset}).")
    add_error_handlers(app)
    add_pages(app, run_dir, info)
    add_predict(app, trained, batcher, max_upload, max_pixels)
    return app


def add_error_handlers(app) -> None:
    """Every refusal as {"detail": "..."}, the shape the OpenAPI document gives (serve_schema.Problem)."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    from .serve_schema import Problem

    @app.exception_handler(Refused)
    async def refused(request, exc: Refused):
        return JSONResponse(Problem(detail=str(exc)).model_dump(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):   # ?top=abc: one line, not FastAPI's list
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error.get("loc", ())[1:]) or "the request"
        detail = f"{where}: {error.get('msg', 'invalid')} (got {error.get('input')!r})"
        return JSONResponse(Problem(detail=detail).model_dump(), status_code=422)


def add_pages(app, run_dir: Path, info) -> None:
    """The page, its icon, ReDoc, /health, /info and the run's report pictures."""
    from fastapi.responses import FileResponse, HTMLResponse, Response

    from .serve_page import FAVICON, PAGE
    from .serve_schema import Health, Info

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return PAGE

    @app.get("/favicon.svg", include_in_schema=False)
    async def favicon():
        return Response(FAVICON, media_type="image/svg+xml")

    add_redoc(app)

    @app.get("/health", summary="Is the server up", response_model=Health)
    async def health() -> Health:
        return Health(status="ok")

    @app.get("/info", summary="The run: model, dataset, classes, accuracy, preprocessing", response_model=Info)
    async def get_info() -> Info:
        return info

    @app.get("/run/{name}", include_in_schema=False)
    async def report(name: str):
        if name not in info.reports:
            raise Refused(404, f"{name} is not one of the run's reports ({', '.join(info.reports)})")
        return FileResponse(run_dir / name, media_type="image/png")


def add_predict(app, trained, batcher: "Batcher", max_upload: int, max_pixels: int) -> None:
    """POST /predict: an image in, the top classes out, through the batcher."""
    from fastapi import Query, Request
    from fastapi.responses import JSONResponse

    from ..data.preprocess import prepare_image
    from .serve_schema import PREDICT_BODY, PREDICT_ERRORS, Prediction, error_responses

    dataset, shape = trained.cfg.dataset, trained.image_shape
    read = dict(max_pixels=max_pixels, resize=trained.cfg.resize, deep=trained.deep)

    @app.post("/predict", summary="Classify an image", openapi_extra=PREDICT_BODY, response_model=Prediction,
              responses=error_responses(PREDICT_ERRORS))
    async def predict(request: Request, top: int = Query(5, ge=1, description="how many classes `top` lists")):
        """An image file (PNG, JPEG, any size up to the limits), as a multipart form field or as
        the body itself. Answers the predicted class and the top classes with their probabilities."""
        data, name = await image_bytes(request, max_upload)
        try:
            if len(data) <= INLINE_DECODE:
                image, notes = prepare_image(data, dataset, shape, name=name, **read)
            else:
                image, notes = await asyncio.to_thread(prepare_image, data, dataset, shape, name=name, **read)
        except TrainkitError as exc:
            raise Refused(413 if "was refused" in str(exc) else 400, str(exc)) from None
        probs = (await batcher(image)).tolist()
        order = sorted(range(len(probs)), key=probs.__getitem__, reverse=True)[:top]
        answer = Prediction(predicted=trained.classes[order[0]], notes=notes,
                            top=[{"class": trained.classes[i], "probability": probs[i]} for i in order],
                            probabilities=dict(zip(trained.classes, probs)))
        # a JSONResponse returned as it is: FastAPI's jsonable_encoder walk is skipped (plain floats and str)
        return JSONResponse(answer.model_dump(by_alias=True))


REDOC_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"   # ReDoc's script loads its maker's logo from here


def add_redoc(app) -> None:
    """/redoc from the fastapi-offline package's copy of ReDoc's script, without the one thing it
    still fetches from the internet: the small logo by "API docs by Redocly", whose <img> ReDoc
    removes itself when it does not load (a `data:` address: nothing leaves the machine)."""
    from fastapi.openapi.docs import get_redoc_html
    from fastapi.responses import Response

    script = Path(importlib.util.find_spec("fastapi_offline").origin).parent / "static" / "redoc.standalone.js"
    code = script.read_text(encoding="utf-8").replace(REDOC_LOGO, "data:,")

    @app.get("/redoc", include_in_schema=False)
    async def redoc():
        return get_redoc_html(openapi_url=app.openapi_url, title=app.title + " - ReDoc",
                              redoc_js_url="/redoc.standalone.js", with_google_fonts=False,
                              redoc_favicon_url="/favicon.svg")

    @app.get("/redoc.standalone.js", include_in_schema=False)
    async def redoc_script():
        return Response(code, media_type="application/javascript")


def cmd_serve(args) -> int:
    missing = [m for m in ("fastapi", "fastapi_offline", "uvicorn", "multipart")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise TrainkitError(f"trainkit serve needs {', '.join(missing)}: pip install trainkit[serve]")
    if args.max_batch < 1:
        raise TrainkitError(f"--max-batch must be at least 1, got {args.max_batch}")
    if not 0 < args.max_upload_mb <= 1024:
        raise TrainkitError(f"--max-upload-mb must be between 0 and 1024, got {args.max_upload_mb}")
    import uvicorn

    if args.threads is not None and args.threads < 1:
        raise TrainkitError(f"--threads must be at least 1, got {args.threads}")
    if args.workers < 1:
        raise TrainkitError(f"--workers must be at least 1, got {args.workers}")
    app = create_app(args.run_dir, backend=args.backend, max_batch=args.max_batch, threads=args.threads,
                     workers=args.workers,
                     max_upload=int(args.max_upload_mb * (1 << 20)))
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except (OSError, OverflowError) as exc:
        raise TrainkitError(f"cannot listen on {args.host}:{args.port}: {getattr(exc, 'strerror', None) or exc}") from None
    port = sock.getsockname()[1]
    print(f"Serving {args.run_dir} on http://{args.host}:{port}/ (API docs: /docs); Ctrl-C stops", file=sys.stderr,
          flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=3)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def add_command(sub) -> None:
    sv = sub.add_parser("serve", help="a run's model on a web page and an HTTP API (pip install trainkit[serve])")
    sv.add_argument("run_dir")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    sv.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    sv.add_argument("--backend", choices=["auto", "torch", "onnx"], default="auto",
                    help="run the model in PyTorch or in ONNX Runtime (the exported model; needs trainkit[onnx]); "
                         "auto (default): ONNX Runtime when it is installed (faster here), else PyTorch")
    sv.add_argument("--max-batch", type=int, default=16,
                    help="most requests answered by one forward (default: 16; 1 turns batching off)")
    sv.add_argument("--threads", type=int, help="the model's CPU threads (default: the cores but one, at least 1)")
    sv.add_argument("--workers", type=int, default=1,
                    help="forwards run at once, each on its own batch in its own thread (default: 1)")
    sv.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_MB,
                    help=f"largest request body accepted, in MiB (default: {MAX_UPLOAD_MB})")
    sv.set_defaults(func=cmd_serve)
