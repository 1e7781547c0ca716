"""`python -m xllm.serve --replicas 2` on Ray Serve (1 thread each), with the `openai` client.

The same route as one server: the answers equal `LLM.generate`'s, and the
requests are spread over both replicas, each counting its own in its
/metrics (labelled with its Ray replica tag; the proxy picks which replica
answers a /metrics request, so the test asks until it has heard from both).
"""

from __future__ import annotations

import asyncio
import re

import openai
import pytest

from xllm.engine import LLM
from xllm.sampling import SamplingParams

from .test_serve import chat_references, metric, start_server, stop_server, streamed_text

REPLICAS = 2


@pytest.fixture(scope="module")
def server(default_gguf, tmp_path_factory):
    live = start_server(["--model", str(default_gguf), "--device", "cpu", "--exact", "--replicas", str(REPLICAS),
                         "--threads", "1", "--max-num-seqs", "8"],
                        tmp_path_factory.mktemp("serve_ray") / "server.log")
    yield live
    stop_server(live)


@pytest.fixture(scope="module")
def llm(default_gguf):
    return LLM(str(default_gguf), device="cpu", exact=True)        # as the server (see test_serve.py)


def test_two_replicas_answer_like_llm_generate_and_both_serve(server, llm):
    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=300)
    model = client.models.list().data[0].id
    prompt = "The capital of France is"
    ref = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12))[0]
    r = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == ref.text and r.usage.completion_tokens == len(ref.token_ids)
    text, _ = streamed_text(client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0,
                                                      stream=True))
    assert text == ref.text

    questions = ["What is the capital of France?", "Name a colour.", "Who are you?", "Say hello.",
                 "What is two plus two?", "Name a fruit.", "What day comes after Monday?", "Name an ocean."]
    refs = chat_references(llm, questions, SamplingParams(temperature=0, max_tokens=8))

    async def ask_all() -> list[str]:
        async with openai.AsyncOpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=300) as c:
            answers = await asyncio.gather(*(c.chat.completions.create(
                model=model, messages=[{"role": "user", "content": q}], max_tokens=8, temperature=0)
                for q in questions))
            return [a.choices[0].message.content for a in answers]

    assert asyncio.run(ask_all()) == [r.text for r in refs]

    served: dict[str, float] = {}       # replica tag -> requests it finished
    for _ in range(40):
        samples = server.metrics()
        tag = re.search(r'replica="([^"]+)"', next(iter(samples))).group(1)
        served[tag] = metric(samples, "xllm_requests_total")
        if len(served) == REPLICAS:
            break
    assert len(served) == REPLICAS, f"only replicas {sorted(served)} answered /metrics"
    assert all(n > 0 for n in served.values()), f"requests per replica: {served}"
    assert sum(served.values()) == 2 + len(questions)
