"""The HTTP API: OpenAI's `/v1/images/generations` (plus bonsai's seed, steps, style), models, health, metrics,
`url` images, SSE progress and the studio page, over one `Engine`."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Callable, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import params, sizes
from ..errors import BonsaiValueError, Cancelled
from .engine import Engine, QueueFull, Rendered, Spec, Unavailable
from .metrics import CONTENT_TYPE, Metrics
from .store import ImageStore

HEARTBEAT_S = 10.0  # an SSE comment while a request waits, so that proxies keep the stream open
CLIENT_GONE = 499  # nginx's "client closed request": recorded in metrics, never seen by a client
MAX_N = 10  # OpenAI's limit for n
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}  # output_format -> content type


@dataclass(frozen=True)
class ServeConfig:
    """Server options (see docs/serve.md); `model_name` is the id in /v1/models and in responses."""

    model_name: str
    max_batch: int = 8
    max_delay_ms: float = 10.0
    max_queue: int = 64
    api_key: str | None = None
    max_body_bytes: int = 64 * 1024
    max_pixels: int = 2048 * 2048
    max_n: int = MAX_N
    url_store_mb: float = 256.0
    shutdown_timeout_s: float = 30.0

    def __post_init__(self):
        params.integer(self.max_batch, "max_batch", 1, params.MAX_BATCH)
        params.finite(self.max_delay_ms, "max_delay_ms", 0, 60_000)
        params.integer(self.max_queue, "max_queue", 1)
        params.integer(self.max_body_bytes, "max_body_bytes", 1024)
        params.integer(self.max_pixels, "max_pixels", sizes.MIN_SIZE**2, sizes.MAX_SIZE**2)
        params.integer(self.max_n, "max_n", 1, params.MAX_PROMPTS)
        params.finite(self.url_store_mb, "url_store_mb", 0, 1e6)
        params.finite(self.shutdown_timeout_s, "shutdown_timeout_s", 0, 3600)
        if self.api_key is not None and not self.api_key.strip():
            raise BonsaiValueError("api_key must not be empty (omit it to serve without a key)")


class GenerationRequest(BaseModel):
    """The body of POST /v1/images/generations: OpenAI's fields, then bonsai's. Unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str
    n: int = 1
    size: str = "auto"
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: int | None = None  # jpeg/webp quality 0-100 (OpenAI's default: 100); not with png
    model: str | None = None
    stream: bool = False
    seed: int | None = None
    steps: int = 4
    style: str | None = None


class ApiError(Exception):
    """An error response: OpenAI's `{"error": {message, type, param, code}}` with an HTTP status."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


def create_app(config: ServeConfig, load: Callable[[], object],
               on_load_failed: Callable[[str], None] | None = None) -> FastAPI:
    """The app; the lifespan starts the engine (which calls `load()` in its worker thread, so /healthz answers
    503 until the model is ready) and at shutdown lets in-flight requests finish for `shutdown_timeout_s`, then
    fails the rest with 503."""
    metrics = Metrics()
    engine = Engine(load, metrics, max_batch=config.max_batch, max_delay_s=config.max_delay_ms / 1000,
                    max_queue=config.max_queue, on_failed=on_load_failed)
    metrics.track(engine.depth, engine.running_images)
    store = ImageStore(int(config.url_store_mb * 1e6))
    studio = _studio_page(config)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(_app):
        engine.start()
        yield
        await run_in_threadpool(engine.close, config.shutdown_timeout_s)

    app = FastAPI(title="bonsai", version=_version(), lifespan=lifespan)
    app.state.config = config
    app.state.engine = engine
    app.state.metrics = metrics
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes, metrics=metrics)

    def error_response(e: ApiError) -> JSONResponse:
        metrics.errors.labels(e.code or str(e.status)).inc()
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(ApiError)
    async def _api_error(_request, e: ApiError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, e: StarletteHTTPException):
        return error_response(ApiError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404
                                       else None, headers=getattr(e, "headers", None)))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request, e: RequestValidationError):
        return error_response(_validation(e.errors()))

    @app.exception_handler(Exception)
    async def _internal_error(_request, e: Exception):
        # A bug, not a bad request: still one JSON line naming the exception (the traceback goes to the log).
        return error_response(ApiError(500, f"internal error: {type(e).__name__}: {e}".splitlines()[0],
                                       code="internal_error"))

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return HTMLResponse(studio)

    @app.get("/healthz")
    async def healthz():
        state = engine.state
        if state == "ready":
            pipe = engine.pipe
            return {"status": "ok", "model": config.model_name, "backend": pipe.backend, "variant": pipe.variant}
        body = {"status": state} | ({"error": engine.error} if engine.error else {})
        return JSONResponse(body, status_code=503, headers={"Retry-After": "5"} if state == "loading" else None)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus():
        return Response(metrics.text(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": started,
                                            "owned_by": "bonsai"}]}

    def image_route(ext: str):
        async def image(image_id: str):
            stored = store.get(image_id)
            if stored is None or stored[1] != MEDIA_TYPES[ext]:
                raise ApiError(404, f"image_id: no image {image_id}.{ext} (ids expire as newer images are stored)",
                               "image_id", "not_found")
            return Response(stored[0], media_type=stored[1], headers={"Cache-Control": "private, max-age=3600"})

        return image

    for ext in MEDIA_TYPES:  # one route per extension: /v1/images/generations stays POST-only (405 for GET)
        app.get(f"/v1/images/{{image_id}}.{ext}", name=f"image.{ext}")(image_route(ext))

    @app.post("/v1/images/generations", dependencies=[Depends(authorize)],
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": GenerationRequest.model_json_schema()}}}})
    async def generations(request: Request):
        arrived = time.monotonic()
        status = 500
        try:
            body = await _parse(request)
            spec = _spec(body, config)
            _quality(body)  # output_compression refused before anything is queued
            try:
                engine.check_prompt(sizes.apply_style(spec.prompt, spec.style))
            except Unavailable as e:
                raise _unavailable(e) from None
            except BonsaiValueError as e:
                raise ApiError(400, str(e).replace("prompt[0]", "prompt", 1), "prompt", "invalid_value") from None
            if body.stream:
                response = _stream(engine, spec, body, request, arrived, respond, record)
                status = 0  # the stream records its own status when it ends
                return response
            job = _submit(engine, spec)
            rendered = await _wait(engine, job, request)
            if rendered is None:
                status = CLIENT_GONE
                return Response(status_code=CLIENT_GONE)
            payload = await run_in_threadpool(respond, rendered, spec, body, request, arrived)
            status = 200
            return JSONResponse(payload)
        except ApiError as e:
            status = e.status
            raise
        finally:
            if status:
                record(status, arrived)

    def record(status: int, arrived: float) -> None:
        metrics.requests.labels(str(status)).inc()
        metrics.latency.observe(time.monotonic() - arrived)

    def respond(rendered: Rendered, spec: Spec, body: GenerationRequest, request: Request, arrived: float) -> dict:
        data = []
        fmt = body.output_format
        for img in rendered.images:
            encoded = encode_image(img, fmt, _quality(body))
            if body.response_format == "url":
                image_id = store.put(encoded, MEDIA_TYPES[fmt])
                item = {"url": str(request.url_for(f"image.{fmt}", image_id=image_id))}
            else:
                item = {"b64_json": base64.b64encode(encoded).decode("ascii")}
            if spec.style is not None:
                item["revised_prompt"] = sizes.apply_style(spec.prompt, spec.style)
            data.append(item)
        metrics.images.inc(len(data))
        metrics.queue_wait.observe(rendered.queued_s)
        r = rendered.report
        return {"created": int(time.time()), "data": data, "bonsai": {
            "model": config.model_name, "seeds": list(spec.seeds), "width": spec.width, "height": spec.height,
            "steps": spec.steps, "style": spec.style,
            "timings": {"queued_s": round(rendered.queued_s, 4), "encode_s": round(r.encode_s, 4),
                        "denoise_s": round(r.denoise_s, 4), "decode_s": round(r.decode_s, 4),
                        "render_s": round(r.total_s, 4), "total_s": round(time.monotonic() - arrived, 4)},
            "peak_memory_gb": r.peak_memory_gb,
            "batch": {"images": rendered.batch_images, "requests": rendered.batch_requests}}}

    return app


# --- request checks ---------------------------------------------------------------------------------------------


async def _parse(request: Request) -> GenerationRequest:
    raw = await request.body()
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(obj).__name__}", code="invalid_json")
    try:
        return GenerationRequest.model_validate(obj)
    except ValidationError as e:
        raise _validation(e.errors()) from None


def _validation(errors) -> ApiError:
    """pydantic errors -> one 422 naming the fields."""
    accepted = ", ".join(GenerationRequest.model_fields)
    parts, first = [], None
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        name = ".".join(loc) or "body"
        first = first or name
        if err.get("type") == "extra_forbidden":
            parts.append(f"{name}: unknown field (accepted: {accepted})")
        elif err.get("type") == "missing":
            parts.append(f"{name}: field required")
        else:
            parts.append(f"{name}: {err.get('msg', 'invalid')}")
    return ApiError(422, "; ".join(parts), first, "invalid_type")


PARAM_OF = {"width": "size", "height": "size"}  # params names the pipeline argument; the API field is `size`


def _spec(body: GenerationRequest, config: ServeConfig) -> Spec:
    """The body's values checked by `bonsai.params` (400 naming the field) -> the engine's Spec."""
    if body.model is not None and body.model != config.model_name:
        raise ApiError(400, f"model: this server serves {config.model_name!r}, got {body.model!r}", "model",
                       "model_not_found")
    try:
        n = params.integer(body.n, "n", 1, config.max_n)
        width = height = None
        if body.size != "auto":
            width, height = sizes.parse_size(body.size)
        req = params.check(body.prompt, width, height, body.steps, body.seed, body.style)
        if req.width * req.height > config.max_pixels:
            raise BonsaiValueError(f"size {req.width}x{req.height} is {req.width * req.height} pixels; this server "
                                   f"renders at most {config.max_pixels}")
        seeds = params.seeds(body.seed, n)
    except BonsaiValueError as e:
        message = str(e)
        word = re.match(r"[a-z_]+", message)
        name = word.group(0) if word else None
        param = PARAM_OF.get(name, name)
        if param == "size" and name != "size":
            message = f"size: {message}"
        raise ApiError(400, message, param, "invalid_value") from None
    return Spec(prompt=req.prompts[0], seeds=seeds, width=req.width, height=req.height, steps=req.steps,
                style=req.style)


# --- queueing and waiting ---------------------------------------------------------------------------------------


def _unavailable(e: Unavailable) -> ApiError:
    return ApiError(503, str(e), code=e.code, headers={"Retry-After": "5"} if e.code == "loading" else None)


def _submit(engine: Engine, spec: Spec, progress=None):
    try:
        return engine.submit(spec, progress)
    except QueueFull as e:
        raise ApiError(429, str(e), code="queue_full", headers={"Retry-After": str(e.retry_after_s)}) from None
    except Unavailable as e:
        raise _unavailable(e) from None


def _failure(e: BaseException) -> ApiError:
    if isinstance(e, Unavailable):
        return _unavailable(e)
    if isinstance(e, Cancelled):
        return ApiError(CLIENT_GONE, str(e), code="cancelled")
    if isinstance(e, BonsaiValueError):
        return ApiError(400, str(e), code="invalid_value")
    return ApiError(500, f"render failed: {type(e).__name__}: {e}".splitlines()[0], code="render_failed")


async def _until_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _wait(engine: Engine, job, request: Request) -> Rendered | None:
    """The job's result, or None if the client disconnected first (the job is then cancelled)."""
    result = asyncio.wrap_future(job.future)
    gone = asyncio.ensure_future(_until_disconnect(request.receive))
    try:
        await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not job.future.done():  # the client went away, or this task was cancelled
            engine.cancel(job)
        if not result.done():
            result.cancel()  # its state would arrive later, unread
    if result.cancelled():
        return None
    if result.exception() is not None:
        raise _failure(result.exception())
    return result.result()


def _stream(engine: Engine, spec: Spec, body: GenerationRequest, request: Request, arrived: float, respond,
            record) -> StreamingResponse:
    """SSE: `queued`, then one `progress` event per denoise step, then `result` (the JSON body of a plain request)
    or `error` ({"error": ..., "status": ...}). Closing the stream cancels the request."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def post(item) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening
            pass

    job = _submit(engine, spec, lambda done, total: post((done, total)))
    job.future.add_done_callback(lambda _f: post(None))
    status, finished = CLIENT_GONE, False

    def finish() -> None:
        # From the generator's `finally`, or as the response's background task when the client left before the
        # stream started (then the generator never runs).
        nonlocal finished
        if not finished:
            finished = True
            if not job.future.done():
                engine.cancel(job)
            record(status, arrived)

    async def events_of_job():
        nonlocal status
        try:
            yield _sse("queued", {"type": "queued", "ahead": max(0, engine.depth() - 1)})
            while True:
                try:
                    item = await asyncio.wait_for(events.get(), HEARTBEAT_S)
                except asyncio.TimeoutError:
                    yield ": waiting\n\n"
                    continue
                if item is None:
                    break
                yield _sse("progress", {"type": "progress", "step": item[0], "steps": item[1]})
            try:
                rendered = job.future.result()
            except Exception as e:  # noqa: BLE001 - every failure becomes the stream's error event
                err = _failure(e)
                status = err.status
                yield _sse("error", {"type": "error", "status": err.status, **err.body()})
                return
            payload = await run_in_threadpool(respond, rendered, spec, body, request, arrived)
            status = 200
            yield _sse("result", {"type": "result", **payload})
        finally:
            finish()

    return StreamingResponse(events_of_job(), media_type="text/event-stream", background=BackgroundTask(finish),
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


# --- responses --------------------------------------------------------------------------------------------------


def _quality(body: GenerationRequest) -> int | None:
    """output_compression checked against output_format -> the jpeg/webp quality (None for png)."""
    if body.output_format == "png":
        if body.output_compression is not None:
            raise ApiError(400, "output_compression: applies to output_format 'jpeg' or 'webp', not 'png'",
                           "output_compression", "invalid_value")
        return None
    if body.output_compression is None:
        return 100
    try:
        return params.integer(body.output_compression, "output_compression", 0, 100)
    except BonsaiValueError as e:
        raise ApiError(400, str(e), "output_compression", "invalid_value") from None


def encode_image(image, fmt: str, quality: int | None) -> bytes:
    """A response image as `output_format` bytes. PNG keeps the image's bonsai.* metadata as text chunks; JPEG
    (full 4:4:4 chroma) and WebP carry pixels only. Encoding times: `benchmarks/encode_formats.py`."""
    from ..pipeline import save_png

    buf = io.BytesIO()
    if fmt == "png":
        save_png(image, buf)
    elif fmt == "jpeg":
        image.save(buf, format="JPEG", quality=quality, subsampling=0)
    else:
        image.save(buf, format="WEBP", quality=quality)
    return buf.getvalue()


def _version() -> str:
    from .. import __version__

    return __version__


def _studio_page(config: ServeConfig) -> str:
    page = resources.files("bonsai.serve").joinpath("static/studio.html").read_text(encoding="utf-8")
    settings = {"model": config.model_name, "styles": list(sizes.STYLES), "maxSteps": params.MAX_STEPS,
                "maxN": config.max_n, "maxPixels": config.max_pixels, "multiple": sizes.MULTIPLE,
                "minSize": sizes.MIN_SIZE, "maxSize": sizes.MAX_SIZE, "defaultSize": params.DEFAULT_SIZE,
                "maxSeed": params.MAX_SEED - 1, "auth": config.api_key is not None}
    return page.replace("/*BONSAI_SETTINGS*/null", json.dumps(settings).replace("</", "<\\/"))


# --- request body limit -----------------------------------------------------------------------------------------


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` (by Content-Length or as read) -> 413 JSON, before any
    route runs. The read body is replayed to the app, then the client's own messages (disconnect) follow."""

    def __init__(self, app, max_bytes: int, metrics: Metrics):
        self.app, self.max_bytes, self.metrics = app, max_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._reject(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._reject(scope, receive, send)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope, receive, send):
        e = ApiError(413, f"request body over {self.max_bytes} bytes", code="body_too_large")
        self.metrics.errors.labels(e.code).inc()
        await JSONResponse(e.body(), status_code=413)(scope, receive, send)


__all__ = ["ServeConfig", "GenerationRequest", "ApiError", "create_app"]
