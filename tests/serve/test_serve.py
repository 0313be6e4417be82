"""The server against the official `openai` client: greedy answers equal `tuneforge.inference.generate` with each
adapter,
streams join to the full answer, and concurrent requests over several adapters each get their own adapter's answer."""

from __future__ import annotations

import concurrent.futures

import pytest

import tuneforge
from tuneforge.inference.generate import generate_ids
from tuneforge.inference.loading import load_for_inference

PROMPTS = ["Say 3 in words.", "What is two plus three?", "Hello! How can I help you today?"]
NEW = 8


@pytest.fixture(scope="module")
def expected(tiny_model_dir, adapter_dirs) -> dict[tuple[str, str], str]:
    """(model name, prompt) -> the chat answer `tuneforge.inference.generate` gives with that adapter (or the bare
    base)."""
    answers = {}
    for name, adapter in [("base", None), *adapter_dirs.items()]:
        model, tokenizer, _ = load_for_inference(str(tiny_model_dir), adapter)
        for prompt, answer in zip(PROMPTS, tuneforge.generate(model, tokenizer, PROMPTS, max_new_tokens=NEW)):
            answers[name, prompt] = answer
    return answers


def chat(client, model: str, prompt: str, **kw) -> str:
    out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                         max_tokens=NEW, temperature=0, **kw)
    return out.choices[0].message.content


def test_models_lists_base_and_adapters(client):
    ids = [m.id for m in client.models.list()]
    assert ids == ["base", "lora-a", "lora-b", "prompt"]


def test_greedy_chat_equals_generate_for_each_adapter(client, expected):
    for name in ["base", "lora-a", "lora-b", "prompt"]:
        for prompt in PROMPTS:
            assert chat(client, name, prompt).strip() == expected[name, prompt], (name, prompt)
    # The adapters matter: not every model gives the base's answers.
    assert len({tuple(expected[n, p] for p in PROMPTS) for n in ["base", "lora-a", "lora-b", "prompt"]}) == 4


def test_completions_equal_generate_ids(client, tiny_model_dir, adapter_dirs):
    model, tokenizer, _ = load_for_inference(str(tiny_model_dir), adapter_dirs["lora-b"])
    prompt = "The quick brown fox"
    ids = tokenizer(prompt)["input_ids"]
    want = tokenizer.decode(generate_ids(model, tokenizer, [ids], max_new_tokens=NEW)[0], skip_special_tokens=True)
    out = client.completions.create(model="lora-b", prompt=prompt, max_tokens=NEW, temperature=0)
    assert out.choices[0].text == want
    assert out.usage.prompt_tokens == len(ids)
    assert out.usage.total_tokens == len(ids) + out.usage.completion_tokens
    assert 1 <= out.usage.completion_tokens <= NEW


def test_stream_joins_to_full_answer(client):
    for name in ["lora-a", "prompt"]:
        full = client.chat.completions.create(model=name, messages=[{"role": "user", "content": PROMPTS[0]}],
                                              max_tokens=NEW, temperature=0)
        stream = client.chat.completions.create(model=name, messages=[{"role": "user", "content": PROMPTS[0]}],
                                                max_tokens=NEW, temperature=0, stream=True,
                                                stream_options={"include_usage": True})
        pieces, finish, usage = [], None, None
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                pieces.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
        assert "".join(pieces) == full.choices[0].message.content
        assert finish == full.choices[0].finish_reason
        assert usage.completion_tokens == full.usage.completion_tokens


def test_completion_stream_joins(client):
    full = client.completions.create(model="lora-a", prompt="Hello", max_tokens=NEW, temperature=0)
    pieces = [c.choices[0].text for c in client.completions.create(model="lora-a", prompt="Hello", max_tokens=NEW,
                                                                     temperature=0, stream=True) if c.choices]
    assert "".join(pieces) == full.choices[0].text


def test_stop_sequence_cuts_the_answer(client):
    answer = chat(client, "lora-a", PROMPTS[1])
    if len(answer) < 3:
        pytest.skip("the tiny model's answer is too short to cut")
    stop = answer[2:4]
    out = client.chat.completions.create(model="lora-a", messages=[{"role": "user", "content": PROMPTS[1]}],
                                         max_tokens=NEW, temperature=0, stop=[stop])
    assert out.choices[0].message.content == answer[:answer.find(stop)]
    assert out.choices[0].finish_reason == "stop"


def test_sampling_with_seed_is_reproducible_and_n_gives_n_choices(client):
    kw = dict(model="lora-b", messages=[{"role": "user", "content": PROMPTS[2]}], max_tokens=NEW,
              temperature=1.5, top_p=0.95, seed=7, n=3)
    first, second = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    texts = [c.message.content for c in first.choices]
    assert len(texts) == 3 and [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in second.choices]
    assert len(set(texts)) > 1  # each choice draws its own tokens


def test_fifty_concurrent_requests_over_three_adapters_and_base(client, expected, server):
    jobs = [(name, PROMPTS[i % len(PROMPTS)]) for i in range(50)
            for name in [["base", "lora-a", "lora-b", "prompt"][i % 4]]]
    batches_before = server.app.state.scheduler.batches_run
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(lambda job: chat(client, *job), jobs, timeout=240))
    for (name, prompt), answer in zip(jobs, answers):
        assert answer.strip() == expected[name, prompt], (name, prompt)
    # Requests were batched: fewer batches than requests.
    assert server.app.state.scheduler.batches_run - batches_before < len(jobs)


def test_per_adapter_methods_added_at_runtime_answer_like_generate(client, server, tiny_model_dir, tmp_path):
    """Prefix tuning, a bottleneck adapter and a LoRA with trained biases cannot share a forward with other adapters;
    added through the admin route, each still answers exactly as `tuneforge.inference.generate` with it."""
    import httpx
    import torch

    specs = {"prefix": tuneforge.PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=False),
             "bottleneck": tuneforge.AdapterConfig(bottleneck_size=8),
             "lora-bias": tuneforge.LoRAConfig(r=2, bias="all", init_lora_weights=False)}
    for i, (name, config) in enumerate(specs.items()):
        model, tokenizer, _ = load_for_inference(str(tiny_model_dir), None)
        torch.manual_seed(10 + i)
        handle = tuneforge.attach(model, config)
        with torch.no_grad():
            for _, p in handle.trainable_parameters():
                p.add_(torch.randn_like(p) * 0.5)  # a visible, non-zero update
        path = handle.save(tmp_path / name, base_model_name_or_path=str(tiny_model_dir))
        added = httpx.post(server.url + "/admin/adapters", json={"name": name, "path": str(path)},
                           headers={"Authorization": "Bearer test-key"}, timeout=60)
        assert added.status_code == 201, added.text
        assert added.json()["batched_with_other_adapters"] is False
        model, tokenizer, _ = load_for_inference(str(tiny_model_dir), path)
        want = tuneforge.generate(model, tokenizer, PROMPTS, max_new_tokens=NEW)
        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:  # mixed with LoRA traffic
            lora = pool.submit(chat, client, "lora-a", PROMPTS[0])
            got = list(pool.map(lambda p, n=name: chat(client, n, p), PROMPTS, timeout=120))
        assert [g.strip() for g in got] == want, name
        assert lora.result(timeout=120).strip() == chat(client, "lora-a", PROMPTS[0]).strip()
        assert httpx.delete(server.url + f"/admin/adapters/{name}", headers={"Authorization": "Bearer test-key"},
                            timeout=60).status_code == 200
