"""The OpenAI-compatible server and the serving benchmark (SPEC section 4: continuous batching behind an API).

    moekit serve --model runs/tiny --port 8000                 # then point any OpenAI client at it:
    OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-").completions.create(model="runs/tiny", prompt="def ")
    moekit bench serve --url http://127.0.0.1:8000 --num-prompts 200 --request-rate 8 --max-concurrency 16

Modules, in the order a request meets them:
  config.py        ServeConfig: every operator setting, validated
  app.py           FastAPI app: auth, body limit, routes, OpenAI-shaped errors, SIGTERM draining
  protocol.py      request bodies -> validated GenerateRequest (400s with the parameter's name)
  chat.py          chat templates: the model's Jinja template, or a documented plain-text default
  async_engine.py  AsyncEngine: the engine steps in its own thread; requests stream through asyncio queues
  responses.py     engine outputs -> OpenAI JSON: completions, chat, stream chunks, logprobs, usage
  metrics.py       Prometheus: latency histograms, queue, KV pool, prefix cache, speculation, experts
  errors.py        APIError and the {"error": {message, type, param, code}} body
  cli.py           `moekit serve`
  bench.py         `moekit bench serve` (vLLM `bench serve` definitions);  sse_client.py: its HTTP client

Nothing here is imported by `moekit.infer`; the server uses only the engine's public API.
"""
