"""Prompt Tuning, and the virtual-token mechanics it shares with P-Tuning: PEFT is the oracle for logits, parameter
counts and files; callers never see the virtual tokens; KV-cached, left-padded generation equals recomputation."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import transformers
from packaging.version import Version
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from conftest import train_and_reload
from tuneforge.inference.generate import generate_ids
from tuneforge.methods import attach, get_method, load_adapter, method_for_adapter
from tuneforge.methods.adapter_files import TUNEFORGE_ADAPTER_META
from tuneforge.methods.kv_cache import cache_kwarg, output_cache
from tuneforge.methods.prompt_tuning import PromptTuning, PromptTuningConfig, text_init_ids
from tuneforge.models.logprobs import token_cross_entropy_sum

peft = pytest.importorskip("peft")

# PEFT 0.21.2's PeftModelForCausalLM.prepare_inputs_for_generation looks for the KV cache under
# model_kwargs["past_key_values"] only; transformers 5.24's generate hands it over as "cache". PEFT then takes every
# decoding step for the first one and prepends the N virtual-token embeddings again, so they pile up in the cache
# (N + 1 new positions per step) and its generate diverges from its own forward.
PEFT_GENERATE_MISSES_CACHE = pytest.mark.xfail(
    condition=Version(peft.__version__) == Version("0.21.2")
    and Version(transformers.__version__).release >= (5, 24),
    reason="PEFT 0.21.2 reads model_kwargs['past_key_values'] in prepare_inputs_for_generation; transformers 5.24 "
           "passes the cache as 'cache', so PEFT re-prepends the virtual tokens at every decoding step",
    strict=True)

# Noise from the oracle: PEFT drops position ids of prompt methods, and calls a deprecated transformers API.
pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.filterwarnings("ignore:Position ids are not supported", "ignore:`is_gradient_checkpointing`")]

N = 4  # virtual tokens


def tiny(arch: str, seed: int = 0):
    """A tiny random model; weights 10x larger than HF's default init so that a prompt visibly steers it."""
    torch.manual_seed(seed)
    if arch == "llama":
        config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
        return LlamaForCausalLM(config).eval()
    if arch == "gpt2":
        config = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2,
                            initializer_range=0.2)
        return GPT2LMHeadModel(config).eval()
    config = OPTConfig(vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                       word_embed_proj_dim=32, max_position_embeddings=64, pad_token_id=0, init_std=0.2)
    return OPTForCausalLM(config).eval()


def tiny_tokenizer():
    """A word-level tokenizer over w0..w123 that prepends <s>: enough to check TEXT initialisation offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i + 4 for i in range(124)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def prompted(arch: str, scale: float = 3.0):
    """A tiny model with a prompt large enough to change its predictions."""
    model = tiny(arch)
    handle = attach(model, PromptTuningConfig(num_virtual_tokens=N, prompt_tuning_init="RANDOM"))
    with torch.no_grad():
        handle.prompt.embedding.weight.mul_(scale)
    return model, handle


def peft_prompt_model(arch: str, table: torch.Tensor):
    model = peft.get_peft_model(tiny(arch), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N))
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.copy_(table)
    return model.eval()


def batch(seed: int = 1, rows: int = 2, length: int = 7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 128, (rows, length), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100  # a prompt part, as SFT batches have
    return ids, torch.ones_like(ids), labels


# -- PEFT oracle ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_logits_loss_and_parameter_count_match_peft(arch):
    model, handle = prompted(arch)
    reference = peft_prompt_model(arch, handle.prompt.embedding.weight)
    assert handle.num_trainable_parameters() == reference.get_nb_trainable_parameters()[0] == N * 32
    ids, mask, labels = batch()
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask, labels=labels)
        theirs = reference(input_ids=ids, attention_mask=mask, labels=labels)
        base = tiny(arch)(input_ids=ids, attention_mask=mask).logits
    assert ours.logits.shape == (2, 7, 128)
    torch.testing.assert_close(ours.logits, theirs.logits[:, N:], rtol=0, atol=1e-6)
    # With labels[:, 0] ignored (as in SFT batches) PEFT's loss is ours; see virtual_tokens.py for the rest.
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=0, atol=1e-6)
    assert (ours.logits - base).abs().max() > 1e-2  # the prompt does something


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_saved_adapter_loads_in_peft_with_same_logits(arch, tmp_path):
    model, handle = prompted(arch)
    handle.save(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["task_type"] == "CAUSAL_LM"
    assert (config["num_virtual_tokens"], config["token_dim"], config["num_layers"], config["num_attention_heads"],
            config["num_transformer_submodules"]) == (N, 32, 2, 4, 1)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert list(saved) == ["prompt_embeddings"] and saved["prompt_embeddings"].shape == (N, 32)
    reference = peft.PeftModel.from_pretrained(tiny(arch), str(tmp_path)).eval()
    ids, mask, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                                   reference(input_ids=ids, attention_mask=mask).logits[:, N:], rtol=0, atol=1e-6)


def test_peft_saved_adapter_loads_in_tuneforge(tmp_path):
    reference = peft.get_peft_model(tiny("llama"), peft.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                           num_virtual_tokens=N)).eval()
    reference.save_pretrained(str(tmp_path))
    assert not (tmp_path / TUNEFORGE_ADAPTER_META).exists()
    assert method_for_adapter(tmp_path) is PromptTuning  # found by PEFT's peft_type alone
    model = tiny("llama")
    handle = load_adapter(model, tmp_path)
    ids, mask, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                                   reference(input_ids=ids, attention_mask=mask).logits[:, N:], rtol=0, atol=1e-6)
    assert handle.num_trainable_parameters() == N * 32  # a loaded prompt can keep training


@pytest.mark.parametrize("text", ["w5 w6", "w1 w2 w3 w4 w5 w6 w7 w8"])
def test_text_init_matches_peft(text, tmp_path):
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(str(tmp_path))
    kwargs = dict(num_virtual_tokens=N, prompt_tuning_init="TEXT", prompt_tuning_init_text=text)
    reference = peft.get_peft_model(tiny("llama"), peft.PromptTuningConfig(
        task_type="CAUSAL_LM", tokenizer_name_or_path=str(tmp_path), **kwargs))
    expected = reference.prompt_encoder["default"].embedding.weight
    bound = attach(tiny("llama"), PromptTuningConfig(**kwargs).bind_tokenizer(tokenizer))
    by_path = attach(tiny("llama"), PromptTuningConfig(tokenizer_name_or_path=str(tmp_path), **kwargs))
    torch.testing.assert_close(bound.prompt.embedding.weight, expected, rtol=0, atol=0)
    torch.testing.assert_close(by_path.prompt.embedding.weight, expected, rtol=0, atol=0)
    ids = text_init_ids(tokenizer(text)["input_ids"], N)
    words = tiny("llama").get_input_embeddings().weight
    torch.testing.assert_close(bound.prompt.embedding.weight, words[ids], rtol=0, atol=0)


def test_text_init_needs_a_tokenizer_and_saves_a_loadable_config(tmp_path):
    config = PromptTuningConfig(num_virtual_tokens=N, prompt_tuning_init="text", prompt_tuning_init_text="w1 w2")
    with pytest.raises(ValueError, match="needs a tokenizer"):
        attach(tiny("llama"), config)
    with pytest.raises(ValueError, match="init_text"):
        PromptTuningConfig(prompt_tuning_init="TEXT")
    handle = attach(tiny("llama"), config.bind_tokenizer(tiny_tokenizer()))
    handle.save(tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    # An in-memory tokenizer has no name: PEFT would refuse TEXT without one, so the file says RANDOM.
    assert saved["prompt_tuning_init"] == "RANDOM"
    assert json.loads((tmp_path / "a" / TUNEFORGE_ADAPTER_META).read_text())["options"]["prompt_tuning_init"] == "TEXT"
    peft.PeftModel.from_pretrained(tiny("llama"), str(tmp_path / "a"))  # loads
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    named = attach(tiny("llama"), PromptTuningConfig(num_virtual_tokens=N, prompt_tuning_init="TEXT",
                                                     prompt_tuning_init_text="w1",
                                                     tokenizer_name_or_path=str(tmp_path / "tok")))
    assert named.adapter_config()["prompt_tuning_init"] == "TEXT"
    assert named.adapter_config()["tokenizer_name_or_path"] == str(tmp_path / "tok")


def test_sample_vocab_init_uses_vocabulary_embeddings():
    model = tiny("llama")
    handle = attach(model, PromptTuningConfig(num_virtual_tokens=N))
    words = model.get_input_embeddings().weight
    for row in handle.prompt.embedding.weight:
        assert (words == row).all(-1).any()


# -- callers never see virtual tokens ---------------------------------------------------------------------


def test_outputs_cover_real_tokens_only():
    model, handle = prompted("llama")
    ids, mask, labels = batch()
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        last = model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits
        keep = labels != -100
        kept = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
        positional = model(ids, mask).logits
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss  # every token labelled, as in pretraining
    assert full.logits.shape == (2, 7, 128) and full.hidden_states[-1].shape == (2, 7, 32)
    torch.testing.assert_close(last, full.logits[:, -1:], rtol=0, atol=1e-6)
    torch.testing.assert_close(kept, full.logits[keep], rtol=0, atol=1e-6)
    torch.testing.assert_close(positional, full.logits, rtol=0, atol=0)
    # The loss is the caller's: position t predicts labels[t + 1]; nothing predicts the first token.
    manual = F.cross_entropy(full.logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, manual, rtol=1e-6, atol=1e-6)
    # The objectives' masked-logits path goes through logits_to_keep and sees the same numbers.
    summed, count = token_cross_entropy_sum(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
    sft = F.cross_entropy(full.logits[:, :-1].reshape(-1, 128), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(summed / count, sft, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_disabled_is_exactly_the_base_model(arch):
    model, handle = prompted(arch)
    ids, mask, _ = batch()
    with torch.no_grad():
        with handle.disabled():
            off = model(input_ids=ids, attention_mask=mask).logits
        on = model(input_ids=ids, attention_mask=mask).logits
        base = tiny(arch)(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(off, base)
    assert not torch.equal(on, base)


def test_a_deep_copy_hooks_its_own_prompt():
    import copy

    model, handle = prompted("llama")
    ids, mask, _ = batch()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        clone = copy.deepcopy(model)
        clone.prompt_encoder.embedding.weight.zero_()
        assert not torch.equal(clone(input_ids=ids, attention_mask=mask).logits, before)
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)


def test_remove_restores_the_plain_model():
    model, handle = prompted("llama")
    base = tiny("llama")
    handle.remove()
    assert model.state_dict().keys() == base.state_dict().keys()
    ids, mask, _ = batch()
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(after, base(input_ids=ids, attention_mask=mask).logits)


# -- generation with the KV cache ------------------------------------------------------------------------


PROMPTS = [[5, 17, 99], [8, 41, 7, 63, 22, 90, 11], [120, 3, 56, 77, 30]]


def greedy_without_cache(model, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    ids, logits = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            logits.append(model(input_ids=torch.tensor([ids])).logits[0, -1])
            ids.append(int(logits[-1].argmax()))
    return ids[len(prompt):], logits


def greedy_with_cache(model, prompts: list[list[int]], steps: int) -> tuple[list[list[int]], list[torch.Tensor]]:
    """tuneforge.inference.generate's calls: left-padded prefill with position ids, then one token per step from the
    cache."""
    from tuneforge.data.batching import left_pad

    ids, mask = left_pad(prompts, 0)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    tokens, logits = [], []
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        next_pos = positions[:, -1:] + 1
        for _ in range(steps):
            logits.append(out.logits[:, -1])
            tokens.append(out.logits[:, -1].argmax(-1))
            mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1)
            out = model(input_ids=tokens[-1][:, None], attention_mask=mask, position_ids=next_pos,
                        use_cache=True, logits_to_keep=1, **{cache_kwarg(model): output_cache(out)})
            next_pos = next_pos + 1
    return torch.stack(tokens, 1).tolist(), logits


def check_generation(model, steps: int = 5) -> list[list[int]]:
    """Cached + left-padded decoding equals recomputation without a cache, row by row, logits and tokens."""
    cached_tokens, cached_logits = greedy_with_cache(model, PROMPTS, steps)
    for row, prompt in enumerate(PROMPTS):
        tokens, logits = greedy_without_cache(model, prompt, steps)
        assert cached_tokens[row] == tokens
        for step in range(steps):
            torch.testing.assert_close(cached_logits[step][row], logits[step], rtol=1e-4, atol=1e-5)
    tokenizer = SimpleNamespace(eos_token_id=None, pad_token_id=0)
    batched = generate_ids(model, tokenizer, PROMPTS, max_new_tokens=steps, batch_size=3)
    alone = [generate_ids(model, tokenizer, [p], max_new_tokens=steps)[0] for p in PROMPTS]
    assert batched == alone == cached_tokens
    return batched


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_cached_left_padded_generation_equals_recomputation(arch):
    model, handle = prompted(arch)
    prompted_tokens = check_generation(model)
    with handle.disabled():  # and the prompt really steers generation
        unprompted = generate_ids(model, SimpleNamespace(eos_token_id=None, pad_token_id=0), PROMPTS,
                                  max_new_tokens=5)
    assert unprompted != prompted_tokens


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hf_generate_works(arch):
    """HF generate through the hooks == our cached loop == recomputation without a cache, row by row."""
    model, handle = prompted(arch)
    from tuneforge.data.batching import left_pad

    ids, mask = left_pad(PROMPTS, 0)
    ours = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert ours[:, :ids.shape[1]].equal(ids)
    expected = greedy_with_cache(model, PROMPTS, 5)[0]
    assert ours[:, ids.shape[1]:].tolist() == expected
    assert expected == [greedy_without_cache(model, prompt, 5)[0] for prompt in PROMPTS]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@PEFT_GENERATE_MISSES_CACHE
def test_hf_generate_matches_peft(arch):
    model, handle = prompted(arch)
    reference = peft_prompt_model(arch, handle.prompt.embedding.weight)
    expected = greedy_with_cache(model, PROMPTS, 5)[0]
    # PEFT numbers left-padded rows differently (its positions ignore the padding); unpadded rows must agree.
    single = torch.tensor([PROMPTS[1]])
    theirs = reference.generate(input_ids=single, attention_mask=torch.ones_like(single), max_new_tokens=5,
                                do_sample=False, pad_token_id=0)
    assert theirs[0, -5:].tolist() == expected[1]


# -- training -----------------------------------------------------------------------------------------------


def train_steps(model, handle, steps: int = 8, lr: float = 5e-2) -> list[float]:
    params = [p for _, p in handle.trainable_parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr)
    ids, mask, labels = batch(seed=3, rows=4, length=10)
    model.train()
    losses = []
    for _ in range(steps):
        loss_sum, count = token_cross_entropy_sum(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
        loss = loss_sum / count
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_training_moves_only_the_prompt_and_lowers_the_loss():
    model = tiny("gpt2")
    handle = attach(model, PromptTuningConfig(num_virtual_tokens=N))
    base = {k: v.clone() for k, v in tiny("gpt2").state_dict().items()}
    start = handle.prompt.embedding.weight.detach().clone()
    losses = train_steps(model, handle)
    assert losses[-1] < losses[0] - 0.1
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in base.items())  # every base weight bit-identical
    assert not torch.equal(handle.prompt.embedding.weight, start)
    assert [n for n, _ in handle.trainable_parameters()] == ["prompt_encoder.embedding.weight"]


def test_run_config_routes_options():
    from tuneforge.config import load_config

    run = load_config(overrides={"method": "prompt-tuning", "prompt_num_virtual_tokens": 8,
                                 "prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "Classify:"})
    config = get_method(run.method).config_class.from_dict(run.method_options)
    assert (config.num_virtual_tokens, config.prompt_tuning_init, config.prompt_tuning_init_text) == (8, "TEXT",
                                                                                                     "Classify:")
    assert "tokenizer" not in config.to_dict()
    with pytest.raises(ValueError, match="unknown option"):
        PromptTuningConfig.from_dict({"num_virtual_tokenz": 3})



def test_trains_through_the_trainer_and_reloads(tmp_path, tokenizer, sft_file):
    """Through the trainer (which binds its tokenizer: TEXT init needs it), saved, reloaded with equal logits."""
    options = {"num_virtual_tokens": 4, "prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "Say it in words"}
    result = train_and_reload(tmp_path, tokenizer, sft_file, "prompt_tuning", options)
    assert result.steps == 2 and result.metrics["trainable_params"] == 4 * 32
