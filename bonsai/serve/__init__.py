"""`bonsai serve`: an OpenAI-compatible image API over one resident `Pipeline`, with dynamic batching.

`engine` owns the pipeline (one worker thread: load, then batched renders), `app` is the FastAPI app over it,
`server` the uvicorn server whose shutdown drains the engine, `metrics` the Prometheus metrics, `store` the bounded
in-memory store of `url` images, `static/studio.html` the studio page. FastAPI, uvicorn and prometheus_client come
with the `serve` extra; importing this package imports none of them. See docs/serve.md.
"""
