"""`python -m xllm.serve` against the official `openai` client, on the default model.

One server per module (a subprocess on 127.0.0.1, started and stopped by the
fixture) with a batch of 16 and a queue of 8. The reference is `LLM.generate`
in this process: the same greedy or seeded request must give the same text
and token count. The helpers at the top (starting a server, reading
/metrics) are shared with tests/test_serve_ray.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from xllm.chat import Conversation
from xllm.engine import LLM
from xllm.sampling import SamplingParams

from .conftest import REPO, shared_file

# ------------------------------------------------------------ a live server and its metrics


@dataclass
class LiveServer:
    url: str                     # http://127.0.0.1:PORT
    process: subprocess.Popen
    log: Path

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics, keyed by name and labels as written (e.g. 'xllm_requests_running{...}')."""
        return parse_metrics(httpx.get(self.url + "/metrics", timeout=30).text)


def parse_metrics(text: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def metric(samples: dict[str, float], name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels` (0 when none)."""
    total = 0.0
    for key, value in samples.items():
        m = re.fullmatch(r"(\w+)\{(.*)\}", key)
        if m and m.group(1) == name and all(f'{k}="{v}"' in m.group(2) for k, v in labels.items()):
            total += value
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], log: Path, timeout: float = 600) -> LiveServer:
    """Run the server on a free port of 127.0.0.1 until /health answers (its output goes to `log`)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = open(log, "w")
    proc = subprocess.Popen([sys.executable, "-m", "xllm.serve", "--host", "127.0.0.1", "--port", str(port), *args],
                            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = LiveServer(f"http://127.0.0.1:{port}", proc, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(server.url + "/health", timeout=5).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(server)
    raise RuntimeError(f"the server did not answer /health within {timeout} s:\n{log.read_text()[-3000:]}")


def stop_server(server: LiveServer) -> None:
    """Ctrl-C, as a user would (Ray then shuts its cluster down); a kill if that takes too long."""
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGINT)
        try:
            server.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait()


def wait_for_metrics(server: LiveServer, done, timeout: float, what: str) -> dict[str, float]:
    """Poll /metrics until `done(samples)`; the samples then. Fails saying `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        samples = server.metrics()
        if done(samples):
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} after {timeout} s")
        time.sleep(0.2)


def idle(samples: dict[str, float]) -> bool:
    """No request running or waiting in the engine."""
    return metric(samples, "xllm_requests_running") + metric(samples, "xllm_requests_waiting") == 0


# ------------------------------------------------------------ fixtures

MAX_NUM_SEQS, MAX_QUEUE = 16, 8


@pytest.fixture(scope="module")
def server(default_gguf, tmp_path_factory):
    # --exact on both sides: a request's numbers must not depend on what else
    # the server batches with it (cpu/intmatmul.py), for the seeded comparisons.
    live = start_server(["--model", str(default_gguf), "--device", "cpu", "--exact", "--max-num-seqs",
                         str(MAX_NUM_SEQS), "--max-queue", str(MAX_QUEUE)],
                        tmp_path_factory.mktemp("serve") / "server.log")
    yield live
    stop_server(live)


@pytest.fixture(scope="module")
def llm(default_gguf):
    return LLM(str(default_gguf), device="cpu", exact=True)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def chat_references(llm, questions: list[str], params: SamplingParams):
    """What `LLM.generate` answers to each user message in the model's chat format (as xllm.chat renders it)."""
    from xllm.chat import detect_format

    fmt, system = detect_format(llm.tokenizer, llm.metadata)
    convo = Conversation(llm.tokenizer, fmt, system)
    params = SamplingParams(**{**params.__dict__, "stop_token_ids": convo.stop_ids})
    return llm.generate([convo.add_user(q) for q in questions], params)


def streamed_text(stream) -> tuple[str, str | None]:
    """The text of a one-choice completion or chat stream, and its finish reason."""
    text, reason = "", None
    for chunk in stream:
        for c in chunk.choices:
            text += (c.text if hasattr(c, "text") else c.delta.content) or ""
            reason = c.finish_reason or reason
    return text, reason


# ------------------------------------------------------------ the API

def test_health_models_and_metrics_page(server, client, model):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert model == "SmolLM2-135M-Instruct.Q4_1"
    page = httpx.get(server.url + "/metrics")
    assert page.headers["content-type"].startswith("text/plain")
    for name in ("xllm_requests_running", "xllm_requests_waiting", "xllm_kv_blocks_used", "xllm_kv_blocks_total",
                 "xllm_prefix_cache_hit_rate", "xllm_generation_tokens_per_second",
                 "xllm_time_to_first_token_seconds", "xllm_time_per_output_token_seconds"):
        assert f"# TYPE {name} " in page.text
    assert metric(server.metrics(), "xllm_kv_blocks_total") > 0


@pytest.mark.parametrize("stream", [False, True])
def test_greedy_completion_equals_llm_generate(client, model, llm, stream):
    prompt = "The capital of France is"
    ref = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16))[0]
    if stream:
        text, reason = streamed_text(client.completions.create(model=model, prompt=prompt, max_tokens=16,
                                                               temperature=0, stream=True))
    else:
        r = client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0)
        text, reason = r.choices[0].text, r.choices[0].finish_reason
        assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
        assert r.usage.completion_tokens == len(ref.token_ids)
    assert text == ref.text
    assert reason == {"length": "length", "eos": "stop", "stop": "stop"}[ref.finish_reason]


def test_seeded_sampling_with_n_choices_equals_llm_generate(client, model, llm):
    prompt = "Once upon a time"
    r = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0.9, top_p=0.95,
                                  seed=11, n=2)
    for i, choice in enumerate(sorted(r.choices, key=lambda c: c.index)):
        ref = llm.generate([prompt], SamplingParams(temperature=0.9, top_p=0.95, seed=11 + i, max_tokens=12))[0]
        assert choice.text == ref.text
    assert r.choices[0].text != r.choices[1].text
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)      # the prompt counts once for n choices


@pytest.mark.parametrize("stream", [False, True])
def test_chat_uses_the_chat_template_and_equals_llm_generate(client, model, llm, stream):
    question = "What is the capital of France?"
    ref = chat_references(llm, [question], SamplingParams(temperature=0, max_tokens=24))[0]
    messages = [{"role": "user", "content": question}]
    if stream:
        text, reason = streamed_text(client.chat.completions.create(model=model, messages=messages, max_tokens=24,
                                                                    temperature=0, stream=True))
    else:
        r = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0)
        text, reason = r.choices[0].message.content, r.choices[0].finish_reason
        assert r.choices[0].message.role == "assistant"
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ref.prompt_token_ids), len(ref.token_ids))
    assert "Paris" in text and text == ref.text
    assert reason == ("stop" if ref.finish_reason in ("eos", "stop") else "length")


def test_stop_strings_penalties_and_usage_in_the_stream(client, model, llm):
    prompt = "List the days of the week: Monday,"
    ref = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20, stop=("Friday",),
                                                repetition_penalty=1.1))[0]
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=20, temperature=0, stop=["Friday"],
                                       presence_penalty=0.6, frequency_penalty=0.4, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == ref.text and "Friday" not in text
    assert chunks[-1].usage.completion_tokens == len(ref.token_ids)     # the usage chunk comes last


# ------------------------------------------------------------ many clients

def test_16_concurrent_streaming_clients_all_finish_with_the_right_text(server, model, llm):
    questions = [q for q in shared_file("prompts.txt").read_text(encoding="utf-8").splitlines() if q.strip()]
    questions = (questions * 2)[:16]
    refs = chat_references(llm, questions, SamplingParams(temperature=0, max_tokens=16))

    async def one(client, question: str) -> str:
        stream = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                                      max_tokens=16, temperature=0, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def all_of_them() -> list[str]:
        async with openai.AsyncOpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=300) as client:
            return await asyncio.gather(*(one(client, q) for q in questions))

    texts = asyncio.run(all_of_them())
    assert texts == [r.text for r in refs]
    assert metric(server.metrics(), "xllm_kv_blocks_used") == 0


def test_a_client_killed_mid_stream_frees_its_blocks_at_once(server, model):
    script = ("import openai, sys\n"
              f"c = openai.OpenAI(base_url={server.v1!r}, api_key='unused', max_retries=0)\n"
              f"for chunk in c.completions.create(model={model!r}, prompt='Tell me a long story.', max_tokens=4000,\n"
              "                                  temperature=0, stream=True, extra_body={'ignore_eos': True}):\n"
              "    print(chunk.choices[0].text, flush=True)\n")
    aborted = metric(server.metrics(), "xllm_requests_total", finish_reason="abort")
    client = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(3):                          # three tokens arrived: it is running, holding blocks
            assert client.stdout.readline()
        assert metric(server.metrics(), "xllm_kv_blocks_used") > 0
    finally:
        client.kill()
        client.wait()
    samples = wait_for_metrics(server, idle, 10, "the killed client's request still runs")
    assert metric(samples, "xllm_kv_blocks_used") == 0
    assert metric(samples, "xllm_requests_total", finish_reason="abort") == aborted + 1


def test_requests_past_the_batch_wait_and_past_the_queue_get_503(server, model):
    body = {"model": model, "prompt": "Count to three:", "max_tokens": 4, "temperature": 0}

    async def scenario():
        async with httpx.AsyncClient(base_url=server.v1, timeout=300) as http:
            # More requests than the batch holds: the rest wait, none is lost.
            answers = await asyncio.gather(*(http.post("/completions", json=body)
                                             for _ in range(MAX_NUM_SEQS + MAX_QUEUE)))
            assert [a.status_code for a in answers] == [200] * (MAX_NUM_SEQS + MAX_QUEUE)
            # Fill the batch and the queue with long streams, then one more is refused at once.
            long = {**body, "max_tokens": 4000, "ignore_eos": True, "stream": True}
            streams = [http.stream("POST", "/completions", json=long) for _ in range(MAX_NUM_SEQS + MAX_QUEUE)]
            responses = await asyncio.gather(*(s.__aenter__() for s in streams))
            try:
                assert all(r.status_code == 200 for r in responses)
                extra = await http.post("/completions", json=body)
                assert extra.status_code == 503 and extra.json()["error"]["code"] == "queue_full"
            finally:
                for s in streams:
                    await s.__aexit__(None, None, None)

    asyncio.run(scenario())
    samples = wait_for_metrics(server, idle, 20, "closed streams are still in the engine")
    assert metric(samples, "xllm_kv_blocks_used") == 0


# ------------------------------------------------------------ bad requests

TOO_LONG = "hello " * 9000      # past the 8192 tokens of SmolLM2's context

BAD_REQUESTS = [     # (what, path, body, the field the error names)
    ("bad JSON", "/completions", b'{"prompt": "Hi",', None),
    ("not an object", "/completions", b'["Hi"]', None),
    ("unknown model", "/completions", {"model": "gpt-4", "prompt": "Hi"}, "model"),
    ("temperature < 0", "/completions", {"prompt": "Hi", "temperature": -1}, "temperature"),
    ("top_p > 1", "/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "top_p": 1.5}, "top_p"),
    ("max_tokens 0", "/completions", {"prompt": "Hi", "max_tokens": 0}, "max_tokens"),
    ("n 0", "/completions", {"prompt": "Hi", "n": 0}, "n"),
    ("seed < 0", "/completions", {"prompt": "Hi", "seed": -3}, "seed"),
    ("presence_penalty 3", "/completions", {"prompt": "Hi", "presence_penalty": 3}, "presence_penalty"),
    ("empty stop", "/completions", {"prompt": "Hi", "stop": [""]}, "stop"),
    ("no prompt", "/completions", {"max_tokens": 4}, "prompt"),
    ("prompt past the context", "/completions", {"prompt": TOO_LONG}, "prompt"),
    ("chat past the context", "/chat/completions", {"messages": [{"role": "user", "content": TOO_LONG}]}, "messages"),
    ("bad role", "/chat/completions", {"messages": [{"role": "robot", "content": "Hi"}]}, "messages"),
    ("logprobs", "/completions", {"prompt": "Hi", "logprobs": 2}, "logprobs"),
]


def test_each_bad_request_gets_a_400_naming_the_field_while_good_streams_finish(server, model, llm):
    prompts = ["The capital of France is", "One, two, three,", "Water boils at", "My favourite colour is"]
    refs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24))

    async def good(http, prompt: str) -> str:
        text = ""
        body = {"model": model, "prompt": prompt, "max_tokens": 24, "temperature": 0, "stream": True}
        async with http.stream("POST", "/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    text += json.loads(line[6:])["choices"][0]["text"]
        return text

    async def bad(http, path: str, body) -> httpx.Response:
        await asyncio.sleep(0.3)              # the good streams are running by now
        if isinstance(body, bytes):
            return await http.post(path, content=body, headers={"content-type": "application/json"})
        return await http.post(path, json=body)

    async def scenario():
        async with httpx.AsyncClient(base_url=server.v1, timeout=300) as http:
            return await asyncio.gather(asyncio.gather(*(good(http, p) for p in prompts)),
                                        asyncio.gather(*(bad(http, path, body) for _, path, body, _ in BAD_REQUESTS)))

    texts, answers = asyncio.run(scenario())
    for (what, _, _, param), answer in zip(BAD_REQUESTS, answers):
        assert answer.status_code == 400, what
        error = answer.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param, (what, error)
        assert error["message"] and "\n" not in error["message"], what
    assert texts == [r.text for r in refs]


def test_the_openai_client_raises_bad_request_with_the_message(client, model):
    with pytest.raises(openai.BadRequestError, match="the prompt has .* tokens and the model's context is 8192"):
        client.completions.create(model=model, prompt=TOO_LONG, max_tokens=4)
