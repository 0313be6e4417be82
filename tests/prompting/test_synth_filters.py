"""Pure pieces of `synth`: reply parsing, judge scores, duplicates, chunking, job ids, the crash-safe log."""

from __future__ import annotations

import json

import pytest

from tuneforge.prompting import (DuplicateIndex, JsonlLog, ReplyFormatError, chunk_text, parse_judge_score,
                                 parse_qa_reply, plan_jobs, read_topics)
from tuneforge.prompting.filters import check_answer_format, check_lengths


@pytest.mark.parametrize("reply", [
    '{"question": "What is LoRA?", "answer": "A low-rank adapter."}',
    'Sure! Here it is:\n```json\n{"question": "What is LoRA?", "answer": "A low-rank adapter."}\n```\nHope it helps.',
    'Here you go: {"Question": "What is LoRA?", "Response": "A low-rank adapter."} -- done',
    '[{"instruction": "What is LoRA?", "output": "A low-rank adapter."}]',
    "Question: What is LoRA?\nAnswer: A low-rank adapter.",
])
def test_parse_qa_reply_finds_the_record_wherever_it_is(reply):
    assert parse_qa_reply(reply) == {"question": "What is LoRA?", "answer": "A low-rank adapter."}


def test_parse_qa_reply_rejects_what_holds_no_record():
    for reply in ["I cannot do that.", '{"question": "Q?"}', '{"question": "Q?", "answer": "   "}',
                  '```json\n{"question": "Q?", "answer": \n```']:
        with pytest.raises(ReplyFormatError):
            parse_qa_reply(reply)
    with pytest.raises(ReplyFormatError, match="rejected"):
        parse_qa_reply('{"question": "Q?", "answer": "A."}', with_rejected=True)
    pair = parse_qa_reply('{"question": "Q?", "answer": "Right.", "worse_answer": "Wrong."}', with_rejected=True)
    assert pair["rejected"] == "Wrong."


def test_parse_qa_reply_keeps_structured_answers_as_json_text():
    record = parse_qa_reply('{"question": "Q?", "answer": {"name": "x", "n": 2}}')
    assert json.loads(record["answer"]) == {"name": "x", "n": 2}


@pytest.mark.parametrize("reply,score", [
    ('{"score": 8, "reason": "ok"}', 8.0), ("```json\n{\"rating\": \"6\"}\n```", 6.0), ("Score: 7/10", 7.0),
    ("I would give it 9/10.", 9.0), ("4", 4.0), ("excellent", None), ('{"score": 11}', None), ("Score: 0", None),
])
def test_parse_judge_score(reply, score):
    assert parse_judge_score(reply) == score


def test_duplicate_index_exact_near_and_distinct():
    index = DuplicateIndex(threshold=0.8)
    base = "How do I choose the LoRA rank r and alpha when fine-tuning a small language model on my own data?"
    assert index.check_and_add(base) is None
    assert index.check_and_add("  how do I choose the LoRA rank R and alpha, when fine-tuning a small "
                               "language model on my own data ") == "exact"  # only case/punctuation differ
    assert index.check_and_add(base.replace("small", "tiny")) == "near"
    assert index.check_and_add("What does the DPO loss optimise, and why does it need a reference model?") is None
    assert index.check_and_add("Short?") is None and index.check_and_add("short") == "exact"


def test_duplicate_index_agrees_with_brute_force_jaccard():
    import random

    from tuneforge.prompting.filters import _jaccard, normalize_text

    rng = random.Random(0)
    vocab = [f"w{i}x" for i in range(60)]
    kept = [" ".join(rng.choices(vocab, k=14)) for _ in range(150)]
    index = DuplicateIndex(threshold=0.7)
    shingles = lambda t: index._shingle_set(normalize_text(t))
    kept_sets = []
    for text in kept:  # oracle: keep only what brute force says is not a near duplicate
        brute = max((_jaccard(shingles(text), s) for s in kept_sets), default=0.0)
        assert (index.check_and_add(text) is None) == (brute < 0.7)
        if brute < 0.7:
            kept_sets.append(shingles(text))
    probes = []
    for text in kept[:60]:  # edit 1-4 words: some stay above the threshold, some fall below
        words = text.split()
        for _ in range(rng.randint(1, 4)):
            words[rng.randrange(len(words))] = rng.choice(vocab)
        probes.append(" ".join(words))
    missed = wrong = near_pairs = 0
    for probe in probes:
        brute = max(_jaccard(shingles(probe), s) for s in kept_sets)
        verdict = index.check_and_add(probe)
        near_pairs += brute >= 0.7
        missed += brute >= 0.7 and verdict != "near"
        wrong += brute < 0.7 and verdict is not None
        if verdict is None:
            kept_sets.append(shingles(probe))
    assert near_pairs >= 10 and wrong == 0
    assert missed <= 1  # LSH may miss a rare borderline pair, never many


def test_length_and_format_checks():
    record = {"question": "Q?" * 10, "answer": "ok"}
    assert check_lengths(record, 3, 100, 1000).startswith("answer has 2 chars")
    assert check_lengths(record, 1, 100, 5).startswith("question has 20 chars")
    assert check_lengths(record, 1, 100, 1000) is None
    assert check_answer_format('{"a": 1}', "json") is None
    assert "not valid JSON" in check_answer_format("{a: 1}", "json")
    assert check_answer_format("2024-01-31", answer_regex=r"\d{4}-\d{2}-\d{2}") is None
    assert check_answer_format("on 2024-01-31", answer_regex=r"\d{4}-\d{2}-\d{2}") is not None  # full match


def test_chunk_text_packs_paragraphs_and_splits_only_oversized_ones():
    paragraphs = [f"Paragraph {i} says something. " * 3 for i in range(6)]
    chunks = chunk_text("\n\n".join(paragraphs), max_chars=250)
    assert all(len(c) <= 250 for c in chunks)
    assert "".join(c.replace("\n\n", "") for c in chunks).replace(" ", "") == \
        "".join(p.strip() for p in paragraphs).replace(" ", "")  # nothing lost
    long = "One sentence here. " * 40
    pieces = chunk_text(long, max_chars=200)
    assert len(pieces) > 3 and all(p.endswith(".") and len(p) <= 200 for p in pieces)  # cut at sentence ends


def test_job_ids_are_deterministic_and_count_extends_the_plan(tmp_path):
    (tmp_path / "t.txt").write_text("alpha\nbeta\n# comment\n\nalpha\n")
    sources = read_topics(tmp_path / "t.txt")
    assert [s.variables["topic"] for s in sources] == ["alpha", "beta"]
    five = plan_jobs(sources, 5, salt="sft|synth_topic")
    assert [j.id for j in five] == [j.id for j in plan_jobs(sources, 5, salt="sft|synth_topic")]
    assert [j.id for j in plan_jobs(sources, 8, salt="sft|synth_topic")][:5] == [j.id for j in five]
    assert len({j.id for j in five}) == 5
    assert {j.id for j in plan_jobs(sources, 5, salt="preference|synth_topic")}.isdisjoint(j.id for j in five)
    assert [(j.source.variables["topic"], j.variation) for j in five[:3]] == [("alpha", 0), ("beta", 0), ("alpha", 1)]
    assert five[0].aspect != five[2].aspect  # the second job on a topic asks for another kind of question


def test_jsonl_log_repairs_a_torn_tail_but_refuses_a_corrupt_middle(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}')  # complete record, newline lost: kept
    with JsonlLog(path) as log:
        log.append({"a": 3})
    assert [json.loads(x)["a"] for x in path.read_text().splitlines()] == [1, 2, 3]
    path.write_text('{"a": 1}\n{"a": 2')
    with JsonlLog(path) as log:
        assert log.records == [{"a": 1}] and log.repaired_bytes == len('{"a": 2')
        log.append({"a": 3})
    assert path.read_text() == '{"a": 1}\n{"a": 3}\n'
    path.write_text('{"a": 1}\nnot json\n{"a": 2}\n')
    with pytest.raises(ValueError, match=r"log\.jsonl:2: corrupt"):
        JsonlLog(path).open()
