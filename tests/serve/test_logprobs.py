"""What evaluation harnesses need from the server: lists of prompts, ``echo`` and ``logprobs`` on completions,
``logprobs`` / ``top_logprobs`` on chat, ``top_k``, ``/tokenize``. Log-probs are pinned to a direct forward of the
model with each adapter (log_softmax in float32), and lm-eval's own ``local-completions`` scores a local
multiple-choice task through the server exactly as the model scores it directly."""

from __future__ import annotations

import concurrent.futures
import json
import math

import httpx
import pytest
import torch

from tuneforge.data.template import prompt_ids
from tuneforge.inference.generate import generate_ids
from tuneforge.inference.loading import load_for_inference

KEY = {"Authorization": "Bearer test-key"}


def post(server, path: str, body: dict) -> dict:
    response = httpx.post(f"{server.url}{path}", json=body, headers=KEY, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def direct(tiny_model_dir, adapter_dirs):
    """``direct(name, ids)``: the float32 log_softmax ``[len(ids), vocab]`` of one forward over ``ids`` with adapter
    ``name`` ("base": none) loaded as `tuneforge generate` loads it."""
    models = {}

    def model(name: str):
        if name not in models:
            models[name] = load_for_inference(str(tiny_model_dir), adapter_dirs.get(name))
        return models[name]

    def logprobs(name: str, ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = model(name)[0](input_ids=torch.tensor([ids])).logits[0, -len(ids):]  # after virtual tokens
        return torch.log_softmax(logits.float(), dim=-1)

    logprobs.greedy = lambda name, ids, new: generate_ids(*model(name)[:2], [ids], max_new_tokens=new)[0]
    return logprobs


def scored(logprobs: torch.Tensor, ids: list[int]) -> list[float]:
    """log p(ids[t + 1]) at each position t."""
    return logprobs[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


def test_a_list_of_prompts_gives_n_choices_per_prompt_in_order(server):
    texts = ["Hello there", "The quick brown fox"]
    body = {"model": "lora-a", "max_tokens": 4, "temperature": 0}
    alone = [post(server, "/completions", {**body, "prompt": t})["choices"][0]["text"] for t in texts]
    out = post(server, "/completions", {**body, "prompt": texts, "n": 2})
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in out["choices"]] == [alone[0], alone[0], alone[1], alone[1]]
    ids = [post(server, "/completions", {**body, "prompt": t, "max_tokens": 0, "echo": True, "logprobs": 0})
           for t in texts]
    assert out["usage"]["prompt_tokens"] == sum(i["usage"]["prompt_tokens"] for i in ids)
    # Token ids: one prompt as a list of ids, or several as a list of lists.
    token_ids = httpx.post(server.url.removesuffix("/v1") + "/tokenize", json={"prompt": texts[1]}, headers=KEY,
                           timeout=30).json()["tokens"]
    assert post(server, "/completions", {**body, "prompt": token_ids})["choices"][0]["text"] == alone[1]
    listed = post(server, "/completions", {**body, "prompt": [token_ids, token_ids[:3]]})
    assert len(listed["choices"]) == 2 and listed["choices"][0]["text"] == alone[1]


@pytest.mark.parametrize("name", ["base", "lora-a", "prompt"])
def test_echoed_prompt_logprobs_equal_a_direct_forward(server, direct, name):
    ids = server.app.state.registry.tokenizer("The quick brown fox jumps over the lazy dog")["input_ids"]
    out = post(server, "/completions", {"model": name, "prompt": ids, "echo": True, "logprobs": 3, "max_tokens": 0})
    choice = out["choices"][0]
    logprobs = choice["logprobs"]
    assert choice["finish_reason"] == "length" and out["usage"]["completion_tokens"] == 0
    assert len(logprobs["tokens"]) == len(ids) and logprobs["token_logprobs"][0] is None
    assert logprobs["top_logprobs"][0] is None
    want = direct(name, ids)
    torch.testing.assert_close(torch.tensor(logprobs["token_logprobs"][1:]), torch.tensor(scored(want, ids)),
                               rtol=0, atol=1e-4)
    for t, (top, own) in enumerate(zip(logprobs["top_logprobs"][1:], logprobs["token_logprobs"][1:])):
        best = want[t].topk(3).values.tolist()
        assert 1 <= len(top) <= 4  # the top 3 and the prompt's own token (tokens that decode alike share a key)
        assert max(top.values()) == pytest.approx(best[0], abs=1e-4)
        assert all(min(abs(v - b) for b in [*best, own]) < 1e-4 for v in top.values())
    assert choice["text"] == server.app.state.registry.tokenizer.decode(ids)
    assert logprobs["text_offset"][0] == 0 and logprobs["text_offset"] == sorted(logprobs["text_offset"])


def test_adapter_and_base_rows_sharing_a_forward_score_as_each_alone(server, direct):
    """The base's and two LoRA adapters' prompts batched into one forward: each scores with its own weights."""
    ids = list(range(40, 50))
    scheduler = server.app.state.scheduler
    scheduler.pause()  # the three requests queue, then run as one batch
    batches = scheduler.batches_run
    try:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            futures = {name: pool.submit(post, server, "/completions", {"model": name, "prompt": ids, "echo": True,
                                                                        "logprobs": 0, "max_tokens": 1})
                       for name in ["base", "lora-a", "lora-b"]}
            while scheduler.queued() < 3:
                pass
            scheduler.resume()
            got = {name: f.result(timeout=120)["choices"][0]["logprobs"]["token_logprobs"]
                   for name, f in futures.items()}
    finally:
        scheduler.resume()
    assert scheduler.batches_run == batches + 1
    for name, logprobs in got.items():
        assert len(logprobs) == len(ids) + 1  # the prompt's and the one generated token's
        torch.testing.assert_close(torch.tensor(logprobs[1:len(ids)]), torch.tensor(scored(direct(name, ids), ids)),
                                   rtol=0, atol=1e-4)
    assert max(abs(a - b) for a, b in zip(got["base"][1:], got["lora-a"][1:])) > 1e-2  # the adapter matters


def test_completion_logprobs_are_those_of_the_generated_tokens(server, direct):
    ids = list(range(60, 70))
    out = post(server, "/completions", {"model": "lora-b", "prompt": ids, "max_tokens": 5, "temperature": 0,
                                        "logprobs": 2})
    logprobs = out["choices"][0]["logprobs"]
    generated = direct.greedy("lora-b", ids, 5)
    assert len(generated) == len(logprobs["tokens"])
    want = direct("lora-b", ids + generated)
    expected = want[len(ids) - 1:-1].gather(-1, torch.tensor(generated)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(logprobs["token_logprobs"]), expected, rtol=0, atol=1e-4)
    for token, logprob, top in zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"]):
        assert math.isclose(max(top.values()), logprob, abs_tol=1e-6) and top[token] == logprob  # greedy


def test_chat_logprobs_and_top_logprobs(client, server, direct):
    messages = [{"role": "user", "content": "Say 3 in words."}]
    out = client.chat.completions.create(model="lora-a", messages=messages, max_tokens=5, temperature=0,
                                         logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    tokenizer = server.app.state.registry.tokenizer
    ids = prompt_ids(tokenizer, messages)
    generated = direct.greedy("lora-a", ids, 5)
    assert len(generated) == len(content)
    want = direct("lora-a", ids + generated)
    for t, c in enumerate(content):
        row = want[len(ids) - 1 + t]
        assert abs(c.logprob - row[generated[t]].item()) < 1e-4
        assert [e.logprob for e in c.top_logprobs] == pytest.approx(row.topk(3).values.tolist(), abs=1e-4)
        assert c.top_logprobs[0].token == c.token and bytes(c.bytes) == c.token.encode()  # greedy
    plain = client.chat.completions.create(model="lora-a", messages=messages, max_tokens=5, temperature=0)
    assert plain.choices[0].logprobs is None
    assert plain.choices[0].message.content == out.choices[0].message.content
    bare = client.chat.completions.create(model="lora-a", messages=messages, max_tokens=2, temperature=0,
                                          logprobs=True)
    assert [c.top_logprobs for c in bare.choices[0].logprobs.content] == [[], []]


def test_top_k_is_honoured(client):
    kw = dict(model="lora-b", prompt="Hello! How can I help you today?", max_tokens=8)
    greedy = client.completions.create(**kw, temperature=0).choices[0].text
    for seed in range(3):
        top1 = client.completions.create(**kw, temperature=1.5, seed=seed, extra_body={"top_k": 1})
        assert top1.choices[0].text == greedy
    sampled = {client.completions.create(**kw, temperature=1.5, seed=s, extra_body={"top_k": 50}).choices[0].text
               for s in range(3)}
    assert sampled != {greedy}


def test_openai_client_reads_echoed_logprobs(client):
    out = client.completions.create(model="base", prompt=["The quick brown fox", "Hello"], echo=True, logprobs=1,
                                    max_tokens=1, temperature=0)
    assert [c.index for c in out.choices] == [0, 1]
    for choice, text in zip(out.choices, ["The quick brown fox", "Hello"]):
        assert choice.text.startswith(text)
        assert choice.logprobs.token_logprobs[0] is None and all(lp <= 0 for lp in choice.logprobs.token_logprobs[1:])
        assert len(choice.logprobs.tokens) == len(choice.logprobs.top_logprobs) == len(choice.logprobs.text_offset)


def test_scoring_options_that_do_not_combine_are_400(server):
    for body in [{"max_tokens": 0}, {"stream": True, "echo": True}, {"stream": True, "logprobs": 1},
                 {"logprobs": 6}, {"logprobs": True}, {"echo": 1}, {"top_logprobs": 2}]:
        response = httpx.post(f"{server.url}/completions", json={"model": "base", "prompt": "hi", **body},
                              headers=KEY, timeout=30)
        assert response.status_code == 400, (body, response.text)


def test_prompts_count_against_the_queue_all_or_none(server):
    """A request's prompts queue together: more than --max-queue (64 here) is 400; more than the queue has room for
    is 429, and none of them is queued."""
    url, body = f"{server.url}/completions", {"model": "base", "max_tokens": 1, "temperature": 0}
    too_many = httpx.post(url, json={**body, "prompt": ["hi"] * 65}, headers=KEY, timeout=30)
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "prompt"
    scheduler = server.app.state.scheduler
    scheduler.pause()
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            first = pool.submit(httpx.post, url, json={**body, "prompt": ["hi"] * 60}, headers=KEY, timeout=120)
            while scheduler.queued() < 60:
                pass
            refused = httpx.post(url, json={**body, "prompt": ["hi"] * 5}, headers=KEY, timeout=30)
            assert refused.status_code == 429 and scheduler.queued() == 60
            scheduler.resume()
            assert len(first.result(timeout=120).json()["choices"]) == 60
    finally:
        scheduler.resume()


def test_tokenize_and_detokenize(server):
    root = server.url.removesuffix("/v1")
    tokens = httpx.post(f"{root}/tokenize", json={"prompt": "Hello world"}, headers=KEY, timeout=30).json()
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 256
    text = httpx.post(f"{root}/detokenize", json={"tokens": tokens["tokens"]}, headers=KEY, timeout=30).json()
    assert text["prompt"].endswith("Hello world")
    chat = httpx.post(f"{root}/tokenize", json={"model": "lora-a", "messages": [{"role": "user", "content": "hi"}]},
                      headers=KEY, timeout=30).json()
    assert chat["tokens"] == prompt_ids(server.app.state.registry.tokenizer, [{"role": "user", "content": "hi"}])
    assert httpx.post(f"{root}/tokenize", json={"prompt": "x"}, timeout=30).status_code == 401
    assert httpx.post(f"{root}/detokenize", json={"tokens": [10**9]}, headers=KEY, timeout=30).status_code == 400


QUESTIONS = [("The capital of France is", ["Paris", "Berlin", "a fox"], 0),
             ("Two plus two equals", ["four", "five", "seven"], 0),
             ("The quick brown fox jumps over the", ["lazy dog", "moon", "table"], 1),
             ("Hello, how are", ["you", "they", "we"], 2),
             ("Water freezes at zero degrees", ["Celsius", "Kelvin", "Fahrenheit"], 0),
             ("The sky is", ["blue", "green", "loud"], 1)]


@pytest.fixture
def mc_task(tmp_path):
    """A local multiple-choice task in lm-eval's YAML format over a local JSONL file."""
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    (tmp_path / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: choices\n"
        "doc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n")
    return tmp_path


@pytest.mark.slow
@pytest.mark.parametrize("name", ["base", "lora-a"])
def test_lm_eval_local_completions_scores_as_the_model_does(server, direct, tiny_model_dir, mc_task, monkeypatch,
                                                            name):
    lm_eval = pytest.importorskip("lm_eval")
    pytest.importorskip("tenacity")  # lm-eval[api]: what its API models need
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("OPENAI_API_KEY", "test-key")  # what local-completions sends as its bearer token
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=f"model={name},base_url={server.url}/completions,tokenizer={tiny_model_dir},"
                   "tokenizer_backend=huggingface,tokenized_requests=True,batch_size=4,max_retries=1",
        tasks=["tiny_mc"], task_manager=TaskManager(include_path=str(mc_task)), log_samples=True,
        num_fewshot=0, random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    # The same log-likelihoods directly: lm-eval's split of context and " " + choice, no BOS, one forward.
    tokenizer = server.app.state.registry.tokenizer
    correct, by_question = 0, {}
    for question, choices, answer in QUESTIONS:
        context = tokenizer(question, add_special_tokens=False)["input_ids"]
        lls = []
        for choice in choices:
            whole = tokenizer(f"{question} {choice}", add_special_tokens=False)["input_ids"]
            lls.append(sum(scored(direct(name, whole), whole)[len(context) - 1:]))
        by_question[question] = lls
        correct += max(range(len(lls)), key=lls.__getitem__) == answer
    assert len(results["samples"]["tiny_mc"]) == len(QUESTIONS)
    for sample in results["samples"]["tiny_mc"]:
        got = [resp[0] for resp in sample["filtered_resps"]]
        assert got == pytest.approx(by_question[sample["doc"]["question"]], abs=1e-3)
    assert results["results"]["tiny_mc"]["acc,none"] == pytest.approx(correct / len(QUESTIONS))


GEN_TASK = """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
"""


@pytest.mark.slow
def test_lm_eval_gives_the_same_numbers_through_the_server_and_in_process(server, tiny_model_dir, adapter_dirs,
                                                                          mc_task, monkeypatch):
    """One adapter, two ways (issue 22): lm-eval's `local-completions` against `tuneforge serve`, and
    `tuneforge eval --tasks`'s in-process run (inference/benchmarks.py) on the same base + adapter: the same
    log-likelihoods
    for a multiple-choice task and the same greedy answers for a generation task."""
    lm_eval = pytest.importorskip("lm_eval")
    pytest.importorskip("tenacity")
    from lm_eval.tasks import TaskManager

    from tuneforge.inference.benchmarks import Benchmarks

    data = mc_task / "gen.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": c[a]}) + "\n" for q, c, a in QUESTIONS))
    (mc_task / "tiny_gen.yaml").write_text(GEN_TASK.format(data=data))
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    served = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=f"model=lora-a,base_url={server.url}/completions,tokenizer={tiny_model_dir},"
                   "tokenizer_backend=huggingface,tokenized_requests=True,batch_size=4,max_retries=1",
        tasks=["tiny_mc", "tiny_gen"], task_manager=TaskManager(include_path=str(mc_task)), log_samples=True,
        num_fewshot=0, random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    model, tokenizer, _ = load_for_inference(str(tiny_model_dir), adapter_dirs["lora-a"])
    local = Benchmarks([str(mc_task / "tiny_mc.yaml"), str(mc_task / "tiny_gen.yaml")], batch_size=4).run(
        model, tokenizer, log_samples=True)

    def responses(run, task):
        return [s["filtered_resps"] for s in sorted(run["samples"][task], key=lambda s: s["doc_id"])]

    for got, want in zip(responses(served, "tiny_mc"), responses(local, "tiny_mc"), strict=True):
        assert [r[0] for r in got] == pytest.approx([r[0] for r in want], abs=1e-3)
    assert responses(served, "tiny_gen") == responses(local, "tiny_gen")
    assert any(doc[0] for doc in responses(local, "tiny_gen"))  # answers were generated, not all cut at once
    for task, metric in (("tiny_mc", "acc,none"), ("tiny_gen", "exact_match,none")):
        assert served["results"][task][metric] == pytest.approx(local["results"][task][metric]), task
