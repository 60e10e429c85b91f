#!/usr/bin/env python3
"""The official `openai` Python client against a running gemmad's HTTP API, over its
Unix socket (an httpx transport with `uds=`; the host in base_url is ignored).

Usage: openai_peer.py HTTP_SOCKET
Prints one line per check and exits non-zero at the first failure; the last line is
"ok". Run by tests/tests/openai_http.rs on the tiny fixture model (random weights: the
text is gibberish, but greedy decoding is deterministic).
"""

import base64
import sys

try:  # openai 3.x uses httpx2; older releases use httpx
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

import openai
from openai import OpenAI


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", flush=True)
        sys.exit(1)


def expect(exc_type, what, fn):
    try:
        fn()
    except exc_type as e:
        print(f"{what}: {type(e).__name__} {e.status_code} code={e.code} param={e.param}: {e.message}", flush=True)
        return e
    except Exception as e:  # noqa: BLE001
        check(False, f"{what}: expected {exc_type.__name__}, got {type(e).__name__}: {e}")
    check(False, f"{what}: expected {exc_type.__name__}, got no error")


sock = sys.argv[1]
client = OpenAI(
    base_url="http://localhost/v1",
    api_key="unused",  # the constructor needs one; the Unix socket goes by uid
    max_retries=0,
    timeout=120,
    http_client=httpx.Client(transport=httpx.HTTPTransport(uds=sock)),
)
print(f"openai {openai.__version__}", flush=True)

# Models: the model's own name first, then the MatFormer slices.
ids = [m.id for m in client.models.list()]
check(len(ids) >= 2 and "full" in ids, f"models: {ids}")
model = ids[0]
check(client.models.retrieve("full").id == "full", "retrieve full")
print(f"models: {ids}", flush=True)

MSGS = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": [{"type": "text", "text": "Tell me about the sea."}]},
]
# The fixture's random weights may end early on EOS; ignore_eos (a llama.cpp extra)
# makes max_tokens decide, so the finish reason is "length".
ARGS = dict(model=model, messages=MSGS, temperature=0, seed=7, extra_body={"ignore_eos": True})

r = client.chat.completions.create(max_tokens=12, user="someone", **ARGS)
text = r.choices[0].message.content
check(r.object == "chat.completion" and r.choices[0].message.role == "assistant", f"shape: {r}")
check(isinstance(text, str) and text != "", f"non-empty content: {r}")
check(r.choices[0].finish_reason == "length", f"finish_reason length: {r}")
u = r.usage
check(u.completion_tokens == 12, f"completion_tokens: {u}")
check(u.prompt_tokens > 0 and u.total_tokens == u.prompt_tokens + u.completion_tokens, f"usage: {u}")
check(u.prompt_tokens_details is not None and u.prompt_tokens_details.cached_tokens >= 0, f"cached: {u}")
print(f"completion: {text!r} usage={u.prompt_tokens}+{u.completion_tokens} cached={u.prompt_tokens_details.cached_tokens}", flush=True)

# max_completion_tokens is the preferred name of the same limit.
r2 = client.chat.completions.create(max_completion_tokens=12, **ARGS)
check(r2.choices[0].message.content == text, f"max_completion_tokens: {r2}")
# The same conversation again resumes from the prompt cache.
check(r2.usage.prompt_tokens_details.cached_tokens > 0, f"cached tokens on a repeat: {r2.usage}")

# Streaming: the deltas make the same text; role first, finish chunk, usage chunk, [DONE].
chunks = list(
    client.chat.completions.create(
        max_tokens=12, stream=True, stream_options={"include_usage": True}, **ARGS
    )
)
check(chunks[0].choices[0].delta.role == "assistant", f"role chunk first: {chunks[0]}")
streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
check(streamed == text, f"streamed {streamed!r} != {text!r}")
finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
check(finish == ["length"], f"finish chunks: {finish}")
check(not chunks[-1].choices and chunks[-1].usage.completion_tokens == 12, f"usage chunk: {chunks[-1]}")
check(all(c.id == chunks[0].id for c in chunks), "one id for every chunk")
print(f"stream: {len(chunks)} chunks, same text", flush=True)

# Without include_usage: no usage chunk.
chunks = list(client.chat.completions.create(max_tokens=4, stream=True, **ARGS))
check(all(c.choices for c in chunks), "no usage chunk unless asked")

# Stop strings (a string, or an array): the text up to the first match, not included.
stop = None
for k in range(1, len(text) - 1):
    cand = text[k : k + 2]
    if cand.strip() and len(cand) == 2:
        stop = cand
        break
check(stop is not None, f"a stop string from {text!r}")
want = text[: text.index(stop)]
for form in (stop, [stop, "\x00never"]):
    r = client.chat.completions.create(max_tokens=12, stop=form, **ARGS)
    got = r.choices[0].message.content
    check(got == want and r.choices[0].finish_reason == "stop", f"stop {form!r}: {got!r} != {want!r} ({r.choices[0].finish_reason})")
print(f"stop {stop!r}: {want!r}", flush=True)

# Bad requests.
e = expect(openai.BadRequestError, "n=2", lambda: client.chat.completions.create(n=2, max_tokens=2, **ARGS))
check(e.param == "n", f"param n: {e.body}")
expect(openai.BadRequestError, "empty messages", lambda: client.chat.completions.create(model=model, messages=[]))
expect(openai.BadRequestError, "temperature 5", lambda: client.chat.completions.create(model=model, messages=MSGS, temperature=5))
e = expect(openai.NotFoundError, "unknown model", lambda: client.chat.completions.create(model="gpt-4o", messages=MSGS))
check(e.code == "model_not_found", f"model_not_found: {e.body}")
expect(openai.NotFoundError, "retrieve unknown model", lambda: client.models.retrieve("gpt-4o"))

# An image as a data: URI is parsed and handed to the core, which has no vision
# encoder yet: a clear 400.
PNG = base64.b64encode(
    bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
        "1f15c4890000000d49444154789c6360000002000100e221bc330000000049454e44ae426082"
    )
).decode()
e = expect(
    openai.BadRequestError,
    "image_url data URI",
    lambda: client.chat.completions.create(
        model=model,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                ],
            }
        ],
    ),
)
check(e.code in ("modality_unavailable", "failed_precondition"), f"media error code: {e.body}")
e = expect(
    openai.BadRequestError,
    "image_url http URL",
    lambda: client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}]}],
    ),
)
check("data: URI" in e.message, f"http image URL message: {e.message}")

print("ok", flush=True)
