"""`bonsai serve` on a tiny synthetic repo, torch backend, loopback only: every image is compared with a plain
`Pipeline` render of the same prompt and seed (<= 2/255); every loop is bounded in count and time."""

import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")
pytest.importorskip("httpx", reason="httpx (for fastapi's TestClient) is not installed")
import httpx  # noqa: E402
import torch  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

import bonsai  # noqa: E402
from bonsai import sizes, testing  # noqa: E402
from bonsai.serve.app import ServeConfig, create_app  # noqa: E402
from bonsai.serve.engine import Engine, Spec  # noqa: E402
from bonsai.serve.metrics import Metrics  # noqa: E402
from bonsai.serve.server import running  # noqa: E402

TOL = 2  # uint8 levels: batched and single renders agree within 2/255 in float32
WAIT_S = 60.0  # bound for every wait on the server


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return testing.write_repo(tmp_path_factory.mktemp("serve") / "tiny-ternary-gemlite", layout="gemlite", seed=0)


@pytest.fixture(scope="module")
def pipe(repo):
    return bonsai.Pipeline.from_pretrained(repo, backend="torch", dtype=torch.float32, keep_text_encoder=True)


def reference(pipe, prompt, seed, width, height, steps, style=None) -> np.ndarray:
    img = pipe(prompt, width=width, height=height, steps=steps, seed=seed, style=style, progress=False).image
    return np.asarray(img, dtype=np.int16)


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.int16)


def wait_until(check, what: str, timeout_s: float = WAIT_S, every_s: float = 0.02):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def ready(client) -> None:
    wait_until(lambda: client.get("/healthz").status_code == 200, "/healthz 200")


class Gate:
    """The real pipeline behind a gate: each call waits until the test opens it (to hold the worker busy), and
    a prompt containing "boom" makes the call fail as a broken render would."""

    def __init__(self, pipe, open_=True):
        self.pipe = pipe
        self.opened = threading.Event()
        self.entered = threading.Semaphore(0)
        self.calls = []
        if open_:
            self.opened.set()

    def __getattr__(self, name):  # tokenizer, text_config, model, variant, backend
        return getattr(self.pipe, name)

    def __call__(self, prompts, **kw):
        self.calls.append(list(prompts))
        self.entered.release()
        assert self.opened.wait(WAIT_S)
        if any("boom" in p for p in prompts):
            raise RuntimeError("synthetic render failure")
        return self.pipe(prompts, **kw)


class Paced:
    """The real pipeline, at least `step_s` per denoise step: a long render stays long on a fast machine."""

    def __init__(self, pipe, step_s=0.01):
        self.pipe, self.step_s = pipe, step_s

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, prompts, callback=None, **kw):
        def paced(step, latents):
            time.sleep(self.step_s)
            callback(step, latents)

        return self.pipe(prompts, callback=paced, **kw)


def app_with(pipe, **options):
    return create_app(ServeConfig(model_name="tiny", **options), lambda: pipe)


@pytest.fixture(scope="module")
def client(pipe):
    with TestClient(app_with(pipe, max_pixels=256 * 256)) as c:
        ready(c)
        yield c


# --- the API --------------------------------------------------------------------------------------------------


def test_generation_equals_pipeline(client, pipe):
    r = client.post("/v1/images/generations", json={"prompt": "a red kite over a beach", "size": "48x32",
                                                    "steps": 2, "seed": 7})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"created", "data", "bonsai"} and len(body["data"]) == 1
    img = decode(body["data"][0]["b64_json"])
    assert img.size == (48, 32)
    ref = reference(pipe, "a red kite over a beach", 7, 48, 32, 2)
    assert np.abs(pixels(img) - ref).max() <= TOL
    assert bonsai.metadata(img) == {"prompt": "a red kite over a beach", "style": None, "seed": 7, "width": 48,
                                    "height": 32, "steps": 2}
    b = body["bonsai"]
    assert b["seeds"] == [7] and (b["width"], b["height"], b["steps"]) == (48, 32, 2)
    assert {"queued_s", "encode_s", "denoise_s", "decode_s", "render_s", "total_s"} <= set(b["timings"])
    assert b["timings"]["total_s"] >= b["timings"]["render_s"] > 0


def test_n3_gives_three_consecutive_seeds_each_its_own_render(client, pipe):
    r = client.post("/v1/images/generations", json={"prompt": "a lighthouse", "n": 3, "size": "32x32", "steps": 1,
                                                    "seed": 40, "style": "sketch"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["bonsai"]["seeds"] == [40, 41, 42] and len(body["data"]) == 3
    for i, item in enumerate(body["data"]):
        assert item["revised_prompt"] == sizes.apply_style("a lighthouse", "sketch")
        img = decode(item["b64_json"])
        assert bonsai.metadata(img)["seed"] == 40 + i
        assert np.abs(pixels(img) - reference(pipe, "a lighthouse", 40 + i, 32, 32, 1, "sketch")).max() <= TOL
    # Without a seed: n random seeds, still consecutive (each image reproducible from its metadata).
    seeds = client.post("/v1/images/generations", json={"prompt": "a lighthouse", "n": 2, "size": "32x32",
                                                         "steps": 1}).json()["bonsai"]["seeds"]
    assert seeds[1] == seeds[0] + 1


def test_url_response_serves_the_same_png(client):
    req = {"prompt": "a teapot", "size": "32x32", "steps": 1, "seed": 3}
    b64 = client.post("/v1/images/generations", json=req).json()["data"][0]["b64_json"]
    r = client.post("/v1/images/generations", json={**req, "response_format": "url"})
    assert r.status_code == 200
    url = r.json()["data"][0]["url"]
    image_id = re.fullmatch(r"http://testserver/v1/images/([A-Za-z0-9_-]+)\.png", url).group(1)
    assert len(image_id) >= 22  # 128 random bits
    png = client.get(url)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert np.array_equal(pixels(Image.open(io.BytesIO(png.content))), pixels(decode(b64)))
    missing = client.get("/v1/images/" + "A" * 22 + ".png")
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "image_id"


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_output_format_jpeg_and_webp(client, fmt):
    """OpenAI's output_format / output_compression: the same render encoded as asked, served by url with its
    content type; quality 100 by default."""
    req = {"prompt": "a teapot", "size": "32x32", "steps": 1, "seed": 3}
    png = pixels(decode(client.post("/v1/images/generations", json=req).json()["data"][0]["b64_json"]))
    sizes_of = {}
    for compression in (None, 10):
        extra = {} if compression is None else {"output_compression": compression}
        r = client.post("/v1/images/generations", json={**req, "output_format": fmt, **extra})
        assert r.status_code == 200, r.text
        b64 = r.json()["data"][0]["b64_json"]
        img = decode(b64)
        assert img.format == fmt.upper() and img.size == (32, 32)
        diff = np.abs(pixels(img) - png).mean()
        print(f"{fmt} output_compression={compression}: {len(base64.b64decode(b64))} bytes, mean diff {diff:.2f}")
        sizes_of[compression] = len(base64.b64decode(b64))
        if compression is None:
            # WebP halves the chroma resolution; another seed's render differs by ~65 on average
            assert diff < (2.0 if fmt == "jpeg" else 20.0)
            default = base64.b64decode(b64)
    assert sizes_of[10] < sizes_of[None]
    url = client.post("/v1/images/generations", json={**req, "output_format": fmt, "response_format": "url"}
                      ).json()["data"][0]["url"]
    assert url.endswith("." + fmt)
    got = client.get(url)
    assert got.status_code == 200 and got.headers["content-type"] == f"image/{fmt}" and got.content == default
    assert client.get(url.rsplit(".", 1)[0] + ".png").status_code == 404  # the id under another format


def test_models_and_health(client):
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]
    health = client.get("/healthz").json()
    assert health == {"status": "ok", "model": "tiny", "backend": "torch", "variant": "ternary-gemlite"}
    page = client.get("/")
    assert page.status_code == 200 and "bonsai studio" in page.text
    settings = re.search(r'<script id="settings" type="application/json">(.*?)</script>', page.text).group(1)
    settings = json.loads(settings)
    assert settings["styles"] == list(sizes.STYLES) and settings["model"] == "tiny"
    assert not re.search(r"""(src|href|url)\s*[=(]\s*["']?(https?:)?//""", page.text)  # nothing from a CDN


OK = {"prompt": "a cat", "size": "32x32", "steps": 1}
BAD = [  # (body changes, status, field named, words in the message)
    ({"size": "100x64"}, 400, "size", "multiple of 16"),
    ({"size": "8192x8192"}, 400, "size", "4096"),
    ({"size": "1024"}, 400, "size", "1024x768"),
    ({"size": "512x512"}, 400, "size", "at most 65536"),  # this server's --max-pixels
    ({"steps": 0}, 400, "steps", "[1, 50]"),
    ({"steps": 51}, 400, "steps", "[1, 50]"),
    ({"prompt": ""}, 400, "prompt", "empty"),
    ({"prompt": "   "}, 400, "prompt", "empty"),
    ({"prompt": "x" * 4001}, 400, "prompt", "4000"),
    ({"prompt": "a " * 300}, 400, "prompt", "tokens"),  # under 4000 characters, over the 512 tokens read
    ({"n": 0}, 400, "n", "[1, 10]"),
    ({"n": 11}, 400, "n", "[1, 10]"),
    ({"seed": -1}, 400, "seed", "seed"),
    ({"seed": 2**32}, 400, "seed", "seed"),
    ({"seed": 2**32 - 2, "n": 3}, 400, "seed", "seed"),
    ({"style": "vivid"}, 400, "style", "sketch"),
    ({"model": "dall-e-3"}, 400, "model", "tiny"),
    ({"response_format": "png"}, 422, "response_format", "response_format"),
    ({"output_format": "gif"}, 422, "output_format", "output_format"),
    ({"output_compression": 50}, 400, "output_compression", "png"),
    ({"output_format": "jpeg", "output_compression": 101}, 400, "output_compression", "[0, 100]"),
    ({"output_format": "webp", "output_compression": "50"}, 422, "output_compression", "integer"),
    ({"quality": "hd"}, 422, "quality", "unknown field"),
    ({"steps": "4"}, 422, "steps", "integer"),
    ({"n": 1.0}, 422, "n", "integer"),
    ({"seed": True}, 422, "seed", "integer"),
    ({"prompt": 5}, 422, "prompt", "string"),
    ({"prompt": ["a", "b"]}, 422, "prompt", "string"),
    ({"stream": "yes"}, 422, "stream", "bool"),
    ({"prompt": None}, 422, "prompt", "string"),
]


@pytest.mark.parametrize("change, status, field, words", BAD,
                         ids=[f"{s}-{f}-{i}" for i, (_, s, f, _) in enumerate(BAD)])
def test_bad_request_fails_alone_with_the_field_named(client, change, status, field, words):
    steps_before = metric(client.get("/metrics").text, "bonsai_denoise_steps_total")
    r = client.post("/v1/images/generations", json={**OK, **change})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == field and field in err["message"] and words in err["message"], err
    assert "\n" not in err["message"] and err["type"] == "invalid_request_error"
    assert metric(client.get("/metrics").text, "bonsai_denoise_steps_total") == steps_before  # nothing rendered


@pytest.mark.parametrize("content, words", [(b"{not json", "not valid JSON"), (b"", "not valid JSON"),
                                            (b"[1, 2]", "JSON object"), (b"\xff\xfe", "not valid JSON")])
def test_body_that_is_not_a_json_object_is_400(client, content, words):
    r = client.post("/v1/images/generations", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400 and words in r.json()["error"]["message"]


def test_missing_prompt_is_422(client):
    r = client.post("/v1/images/generations", json={"size": "32x32"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "prompt"
    assert "required" in r.json()["error"]["message"]


def test_unknown_route_and_method_are_json_errors(client):
    assert client.get("/v1/nope").json()["error"]["type"] == "not_found_error"
    r = client.get("/v1/images/generations")
    assert r.status_code == 405 and "error" in r.json()


def test_api_key(pipe):
    with TestClient(app_with(pipe, api_key="s3cret")) as c:
        ready(c)  # /healthz and /metrics need no key
        assert c.get("/metrics").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                        {"Authorization": "Basic s3cret"}):
            r = c.post("/v1/images/generations", json=OK, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", headers
            assert r.json()["error"]["type"] == "authentication_error"
            assert c.get("/v1/models", headers=headers).status_code == 401
        good = {"Authorization": "Bearer s3cret"}
        assert c.get("/v1/models", headers=good).status_code == 200
        r = c.post("/v1/images/generations", json=OK, headers=good)
        assert r.status_code == 200
        assert c.post("/v1/images/generations", json={**OK, "response_format": "url"},
                      headers=good).status_code == 200
        assert c.get("/").status_code == 200 and '"auth": true' in c.get("/").text


def test_body_over_the_limit_is_413(pipe):
    with TestClient(app_with(pipe, max_body_bytes=2048)) as c:
        ready(c)
        big = json.dumps({**OK, "prompt": "y" * 3000}).encode()
        r = c.post("/v1/images/generations", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
        chunked = c.post("/v1/images/generations", content=iter([big[:1500], big[1500:]]),
                         headers={"content-type": "application/json"})  # no Content-Length: counted as read
        assert chunked.status_code == 413
        assert c.post("/v1/images/generations", json=OK).status_code == 200


def test_full_queue_is_429_with_retry_after(pipe):
    gate = Gate(pipe, open_=False)
    with TestClient(create_app(ServeConfig(model_name="tiny", max_batch=1, max_queue=1), lambda: gate)) as c:
        ready(c)
        results = {}

        def post(name):
            results[name] = c.post("/v1/images/generations", json={**OK, "seed": len(results)})

        first = threading.Thread(target=post, args=("running",))
        first.start()
        assert gate.entered.acquire(timeout=WAIT_S)  # the worker holds request 1
        second = threading.Thread(target=post, args=("queued",))
        second.start()
        wait_until(lambda: metric(c.get("/metrics").text, "bonsai_queue_depth") == 1, "one queued request")
        r = c.post("/v1/images/generations", json=OK)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "queue_full"
        gate.opened.set()
        for t in (first, second):
            t.join(WAIT_S)
        assert results["running"].status_code == 200 and results["queued"].status_code == 200


def test_health_is_503_until_the_model_is_loaded(pipe):
    loaded = threading.Event()

    def slow_load():
        assert loaded.wait(WAIT_S)
        return pipe

    with TestClient(create_app(ServeConfig(model_name="tiny"), slow_load)) as c:
        r = c.get("/healthz")
        assert r.status_code == 503 and r.json()["status"] == "loading" and r.headers["retry-after"]
        r = c.post("/v1/images/generations", json=OK)
        assert r.status_code == 503 and r.json()["error"]["code"] == "loading"
        assert c.post("/v1/images/generations", json={**OK, "steps": 0}).status_code == 400  # checks need no model
        loaded.set()
        ready(c)
        assert c.post("/v1/images/generations", json=OK).status_code == 200


def test_failed_load_is_reported(tmp_path):
    def bad_load():
        return bonsai.Pipeline.from_pretrained(tmp_path / "nothing-here", backend="torch")

    failures = []
    with TestClient(create_app(ServeConfig(model_name="x"), bad_load, on_load_failed=failures.append)) as c:
        r = wait_until(lambda: (h := c.get("/healthz")).json()["status"] == "failed" and h, "a failed load")
        assert r.status_code == 503 and "nothing-here" in r.json()["error"]
        r = c.post("/v1/images/generations", json=OK)
        assert r.status_code == 503 and r.json()["error"]["code"] == "failed"
    assert len(failures) == 1 and "nothing-here" in failures[0]


def test_a_failing_request_fails_alone(pipe):
    gate = Gate(pipe, open_=False)
    app = create_app(ServeConfig(model_name="tiny", max_batch=8, max_delay_ms=50), lambda: gate)
    with TestClient(app) as c:
        ready(c)
        results = {}

        def post(prompt, seed):
            results[prompt] = c.post("/v1/images/generations", json={**OK, "prompt": prompt, "seed": seed})

        blocker = threading.Thread(target=post, args=("a blocker", 1))
        blocker.start()
        assert gate.entered.acquire(timeout=WAIT_S)
        # Three requests queue behind the held worker, so they are taken as one batch.
        threads = [threading.Thread(target=post, args=(p, s)) for p, s in (("a dog", 2), ("boom", 3), ("a fox", 4))]
        for t in threads:
            t.start()
        wait_until(lambda: metric(c.get("/metrics").text, "bonsai_queue_depth") == 3, "three queued requests")
        gate.opened.set()
        for t in [blocker, *threads]:
            t.join(WAIT_S)
        assert sorted(gate.calls[1]) == ["a dog", "a fox", "boom"]  # the batched call, which failed
        assert results["boom"].status_code == 500
        assert results["boom"].json()["error"]["code"] == "render_failed"
        assert "synthetic render failure" in results["boom"].json()["error"]["message"]
        for prompt, seed in (("a dog", 2), ("a fox", 4)):
            r = results[prompt]
            assert r.status_code == 200, r.text
            assert np.abs(pixels(decode(r.json()["data"][0]["b64_json"])) -
                          reference(pipe, prompt, seed, 32, 32, 1)).max() <= TOL
        assert c.post("/v1/images/generations", json=OK).status_code == 200  # still serving


def test_a_failing_streamed_request_ends_with_an_error_event(pipe):
    with TestClient(create_app(ServeConfig(model_name="tiny"), lambda: Gate(pipe))) as c:
        ready(c)
        r = c.post("/v1/images/generations", json={**OK, "prompt": "boom", "stream": True})
        assert r.status_code == 200
        blocks = [b for b in r.text.split("\n\n") if b.startswith("event:")]
        assert [b.split("\n")[0] for b in blocks] == ["event: queued", "event: error"]
        error = json.loads(blocks[-1].split("\n")[1][6:])
        assert error["status"] == 500 and error["error"]["code"] == "render_failed"
        assert metric(c.get("/metrics").text, "bonsai_requests_total", '{status="500"}') == 1


def test_engine_batches_compatible_jobs_only(pipe):
    gate = Gate(pipe, open_=False)
    engine = Engine(lambda: gate, Metrics(), max_batch=4, max_delay_s=0.0, max_queue=16)
    engine.start()
    try:
        wait_until(lambda: engine.state == "ready", "engine ready")
        first = engine.submit(Spec("hold", (0,), 32, 32, 1))
        assert gate.entered.acquire(timeout=WAIT_S)
        a = [engine.submit(Spec(f"a{i}", (i,), 32, 32, 1)) for i in range(3)]
        b = engine.submit(Spec("other size", (9,), 48, 32, 1))
        big = engine.submit(Spec("five", (20, 21, 22, 23, 24), 32, 32, 1))  # more than max_batch: alone, chunked
        gate.opened.set()
        results = [j.future.result(WAIT_S) for j in (first, *a, b, big)]
        assert [r.batch_requests for r in results] == [1, 3, 3, 3, 1, 1]
        assert gate.calls[1:] == [["a0", "a1", "a2"], ["other size"], ["five"] * 5]
        assert [bonsai.metadata(img)["seed"] for img in results[-1].images] == [20, 21, 22, 23, 24]
        for i, r in enumerate(results[1:4]):
            assert np.abs(pixels(r.images[0]) - reference(pipe, f"a{i}", i, 32, 32, 1)).max() <= TOL
    finally:
        engine.close(5)


def test_engine_cancel_drops_queued_and_stops_running_jobs(pipe):
    gate = Gate(pipe, open_=False)
    metrics = Metrics()
    engine = Engine(lambda: gate, metrics, max_batch=4, max_delay_s=0.0, max_queue=16)
    engine.start()
    try:
        wait_until(lambda: engine.state == "ready", "engine ready")
        running_job = engine.submit(Spec("hold", (0,), 32, 32, 2))
        assert gate.entered.acquire(timeout=WAIT_S)
        queued = engine.submit(Spec("never rendered", (1,), 48, 32, 1))
        engine.cancel(queued)
        assert engine.depth() == 0
        with pytest.raises(bonsai.Cancelled):
            queued.future.result(0)
        engine.cancel(running_job)  # its batch has no other job: the render stops
        gate.opened.set()
        with pytest.raises(bonsai.Cancelled):
            running_job.future.result(WAIT_S)
        after = engine.submit(Spec("after", (2,), 32, 32, 1)).future.result(WAIT_S)
        assert np.abs(pixels(after.images[0]) - reference(pipe, "after", 2, 32, 32, 1)).max() <= TOL
        assert gate.calls == [["hold"], ["after"]]
        assert metric(metrics.text().decode(), "bonsai_denoise_steps_total") == 1  # only "after"'s step ran
    finally:
        engine.close(5)


# --- a real server on a loopback port -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live(pipe):
    app = create_app(ServeConfig(model_name="tiny", max_batch=8, max_delay_ms=100, max_queue=64),
                     lambda: Paced(pipe))
    with running(app) as (url, _server):
        wait_until(lambda: httpx.get(url + "/healthz").status_code == 200, "live /healthz")
        yield url


def test_32_concurrent_clients_batched_and_exact(live, pipe):
    sizes_ = [(32, 32), (48, 32)]
    jobs = [{"prompt": f"object number {i}", "seed": 100 + i, "size": "%dx%d" % sizes_[i % 2], "steps": 1}
            for i in range(30)]
    jobs += [{"prompt": "bad", "steps": 0, "size": "32x32"}, {"prompt": "bad", "size": "33x32"}]
    before = httpx.get(live + "/metrics").text
    results = [None] * len(jobs)

    def post(i):
        with httpx.Client(timeout=WAIT_S) as h:
            results[i] = h.post(live + "/v1/images/generations", json=jobs[i])

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S * 2)
    assert all(r is not None for r in results), "a client got no answer"
    assert [r.status_code for r in results[-2:]] == [400, 400]
    after = httpx.get(live + "/metrics").text
    batches = metric(after, "bonsai_batch_images_count") - metric(before, "bonsai_batch_images_count")
    single = metric(after, "bonsai_batch_images_bucket", '{le="1.0"}') - metric(before, "bonsai_batch_images_bucket",
                                                                                 '{le="1.0"}')
    assert batches - single > 0, "no batched forward of more than one image"
    assert batches < 30
    for job, r in zip(jobs[:30], results[:30]):
        assert r.status_code == 200, r.text
        w, h = map(int, job["size"].split("x"))
        got = pixels(decode(r.json()["data"][0]["b64_json"]))
        assert np.abs(got - reference(pipe, job["prompt"], job["seed"], w, h, 1)).max() <= TOL, job


def read_metrics(url):
    return httpx.get(url + "/metrics").text


def test_client_disconnect_cancels_and_does_not_wedge(live):
    before = read_metrics(live)
    body = json.dumps({"prompt": "a long render", "size": "128x128", "steps": 50, "seed": 1}).encode()
    host, port = live.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=WAIT_S)
    sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    wait_until(lambda: metric(read_metrics(live), "bonsai_running_images") == 1, "the long render to start")
    sock.close()
    wait_until(lambda: metric(read_metrics(live), "bonsai_cancelled_total") ==
               metric(before, "bonsai_cancelled_total") + 1, "the cancel")
    r = httpx.post(live + "/v1/images/generations", json=OK, timeout=WAIT_S)
    assert r.status_code == 200
    after = read_metrics(live)
    steps = metric(after, "bonsai_denoise_steps_total") - metric(before, "bonsai_denoise_steps_total")
    assert steps < 50 + 1, "the cancelled render ran to the end"
    assert metric(after, "bonsai_requests_total", '{status="499"}') >= 1


def test_closing_the_progress_stream_cancels(live):
    before = read_metrics(live)
    events = []
    with httpx.Client(timeout=WAIT_S) as h:
        with h.stream("POST", live + "/v1/images/generations",
                      json={"prompt": "a streamed render", "size": "128x128", "steps": 50, "stream": True}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line.startswith("event: "):
                    events.append(line[7:])
                if events.count("progress") == 2:
                    break
    assert events[:3] == ["queued", "progress", "progress"]
    wait_until(lambda: metric(read_metrics(live), "bonsai_cancelled_total") ==
               metric(before, "bonsai_cancelled_total") + 1, "the cancel")
    assert httpx.post(live + "/v1/images/generations", json=OK, timeout=WAIT_S).status_code == 200
    steps = metric(read_metrics(live), "bonsai_denoise_steps_total") - metric(before, "bonsai_denoise_steps_total")
    assert steps < 50 + 1, "the cancelled render ran to the end"


def test_progress_stream_one_event_per_step_then_result(live, pipe):
    with httpx.Client(timeout=WAIT_S) as h:
        r = h.post(live + "/v1/images/generations", json={**OK, "steps": 3, "seed": 5, "stream": True})
    blocks = [b for b in r.text.split("\n\n") if b.startswith("event:")]
    names = [b.split("\n")[0][7:] for b in blocks]
    assert names == ["queued", "progress", "progress", "progress", "result"]
    steps = [json.loads(b.split("\n")[1][6:])["step"] for b in blocks[1:4]]
    assert steps == [1, 2, 3]
    result = json.loads(blocks[-1].split("\n")[1][6:])
    assert np.abs(pixels(decode(result["data"][0]["b64_json"])) - reference(pipe, "a cat", 5, 32, 32, 3)).max() <= TOL
    # A request refused before queueing is a plain HTTP error, not a stream.
    bad = httpx.post(live + "/v1/images/generations", json={**OK, "steps": 0, "stream": True})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "steps"


def test_the_openai_client_speaks_to_it(live, pipe):
    openai = pytest.importorskip("openai", reason="the openai client is not installed")
    client = openai.OpenAI(base_url=live + "/v1", api_key="unused", max_retries=0, timeout=WAIT_S)
    assert [m.id for m in client.models.list()] == ["tiny"]
    r = client.images.generate(model="tiny", prompt="a paper boat", size="32x32", n=2, response_format="b64_json",
                               extra_body={"seed": 11, "steps": 2})
    assert len(r.data) == 2 and r.model_extra["bonsai"]["seeds"] == [11, 12]
    for i, item in enumerate(r.data):
        assert np.abs(pixels(decode(item.b64_json)) - reference(pipe, "a paper boat", 11 + i, 32, 32, 2)).max() <= TOL
    jpeg = client.images.generate(model="tiny", prompt="a paper boat", size="32x32", output_format="jpeg",
                                  output_compression=90, extra_body={"seed": 11, "steps": 2})
    assert decode(jpeg.data[0].b64_json).format == "JPEG"
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(model="tiny", prompt="a paper boat", size="33x32")
    assert e.value.body["param"] == "size"


def queue_requests(url, gate, n, results) -> list[threading.Thread]:
    """n requests posted from threads: the first runs (held at the shut gate), the others wait in the queue.
    results[i]: request i's response, or its httpx error if it was dropped."""

    def post(i):
        try:
            results[i] = httpx.post(url + "/v1/images/generations", json={**OK, "seed": i}, timeout=WAIT_S)
        except httpx.HTTPError as e:
            results[i] = e

    threads = [threading.Thread(target=post, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    assert gate.entered.acquire(timeout=WAIT_S)
    wait_until(lambda: metric(read_metrics(url), "bonsai_queue_depth") == n - 1, f"{n - 1} queued requests")
    return threads


def test_graceful_shutdown_answers_every_request(pipe):
    gate = Gate(pipe, open_=False)
    app = create_app(ServeConfig(model_name="tiny", max_batch=1, shutdown_timeout_s=1.0), lambda: gate)
    results = {}
    with running(app) as (url, http):
        wait_until(lambda: httpx.get(url + "/healthz").status_code == 200, "/healthz 200")
        threads = queue_requests(url, gate, 4, results)
        http.should_exit = True  # as SIGTERM does
        time.sleep(0.3)
        gate.opened.set()  # the running request finishes; the queued ones finish or, past the 1 s deadline, get 503
        for t in threads:
            t.join(WAIT_S)
    assert len(results) == 4
    for i, r in results.items():
        assert isinstance(r, httpx.Response), f"request {i} was dropped: {r!r}"
        assert r.status_code in (200, 503), r.text
        if r.status_code == 503:
            assert r.json()["error"]["code"] == "shutting_down"
    assert results[0].status_code == 200
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/healthz", timeout=5)


def test_shutdown_deadline_fails_what_is_left_with_503(pipe):
    gate = Gate(pipe, open_=False)
    app = create_app(ServeConfig(model_name="tiny", max_batch=1, shutdown_timeout_s=0.5), lambda: gate)
    results = {}
    with running(app) as (url, http):
        wait_until(lambda: httpx.get(url + "/healthz").status_code == 200, "/healthz 200")
        threads = queue_requests(url, gate, 3, results)
        http.should_exit = True
        # The gate stays shut past the deadline: the queued requests get 503 at once, the running one when its
        # render is cancelled at its next step.
        wait_until(lambda: len(results) == 2, "the queued requests' answers", timeout_s=10)
        gate.opened.set()
        for t in threads:
            t.join(WAIT_S)
    assert all(isinstance(r, httpx.Response) for r in results.values()), results
    assert sorted(r.status_code for r in results.values()) == [503, 503, 503]
    assert all(r.json()["error"]["code"] == "shutting_down" for r in results.values())


def test_cli_serve_with_env_api_key_and_ctrl_c(repo):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "BONSAI_API_KEY": "from-env"}
    proc = subprocess.Popen([sys.executable, "-m", "bonsai.cli", "serve", "--model", str(repo), "--backend", "torch",
                             "--dtype", "float32", "--port", str(port), "--max-delay-ms", "1", "--max-batch", "2",
                             "--warmup", "32x32"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def healthy():
            try:
                return httpx.get(url + "/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                assert proc.poll() is None, proc.communicate()[1]
                return False

        wait_until(healthy, "the CLI server", every_s=0.2)
        assert httpx.post(url + "/v1/images/generations", json=OK).status_code == 401
        r = httpx.post(url + "/v1/images/generations", json=OK, headers={"Authorization": "Bearer from-env"},
                       timeout=WAIT_S)
        assert r.status_code == 200 and r.json()["bonsai"]["model"] == repo.name
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 130, err
    assert "Traceback" not in err


def test_cli_serve_checks_arguments_before_loading(tmp_path, capsys):
    from test_cli import bonsai_main  # in this process: the Ctrl-C test above runs the console script

    for args, words in ((["--warmup", "100x64"], "multiple of 16"), (["--max-batch", "0"], "max_batch"),
                        (["--port", "70000"], "--port")):
        r = bonsai_main(capsys, "serve", "--model", tmp_path / "absent", "--backend", "torch", *args)
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_cli_serve_exits_when_the_model_does_not_load(tmp_path, capsys):
    from test_cli import bonsai_main

    (tmp_path / "empty").mkdir()
    r = bonsai_main(capsys, "serve", "--model", tmp_path / "empty", "--backend", "torch", "--port", "0")
    assert r.returncode == 2 and "the model failed to load" in r.stderr and "empty" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
