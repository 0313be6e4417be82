"""Export a run for another runtime: a GGUF file for llama.cpp / Ollama, or the layout vLLM serves.

GGUF (``export_gguf``): the adapter is merged into the base (``handle.merge_and_unload()``, so only the LoRA family
and full fine-tuning export) and written with the ``gguf`` package: llama.cpp's tensor names
(``gguf.get_tensor_name_map``, the table transformers' GGUF loader inverts), Llama's Q / K rows permuted the way
llama.cpp's converter does (transformers' loader un-permutes them), the model's hyper-parameters, and the tokenizer
(byte-level BPE: tokens, types, merges, special ids) with its chat template. Llama- and Qwen2-family models.
``tokenizer.ggml.pre`` names the pre-tokenizer llama.cpp must apply, found as its converter finds it
(``gguf_pretokenizer``); ``general.name`` is the base model's own name (the source GGUF's, or its folder / hub name).

Ollama (``export_ollama``): a folder with the GGUF and a ``Modelfile`` (FROM, TEMPLATE in Go-template form for
ChatML-style chat templates, SYSTEM for a template's default system message, PARAMETER stop).

vLLM (``export_vllm``): a plain LoRA adapter stays an adapter beside the saved base (vLLM applies LoRA per request);
any other mergeable adapter is merged; prompt / prefix / bottleneck adapters have no vLLM form.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..inference.loading import default_model, load_for_inference
from ..methods.adapter_files import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, read_adapter_config
from .gguf_pretokenizer import pretokenizer_name
from ..models.loading import source_gguf
from ..outputs import check_output, staged_dir, staged_file
from ..inference.multi_lora import batchable_lora

GGUF_ARCHITECTURES = ("llama", "qwen2")
GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")


@dataclasses.dataclass
class ExportResult:
    path: Path
    command: str | None = None  # how to serve it
    verification: dict[str, Any] | None = None  # verify.verify's summary, when export verified the artefact

    def summary(self) -> str:
        text = f"wrote {self.path}" + (f"\nserve it with:\n  {self.command}" if self.command else "")
        if self.verification is not None:
            from .verify import format_summary

            text += "\n" + format_summary(self.verification)
        return text

    @property
    def passed(self) -> bool:
        """False only when a verification ran and failed."""
        return self.verification is None or self.verification["passed"]


def export(run: str | Path, format: str, output: str | Path | None = None, dtype: str = "f16",
           model: str | None = None, device: str | None = None, overwrite: bool = False,
           verify: bool = True) -> ExportResult:
    """``tuneforge export``: ``format`` is ``gguf``, ``ollama`` or ``vllm``; ``output`` defaults to beside the run.

    The output is checked before anything loads (``outputs.check_output``): never the run or the base model, nor
    inside or around either; an existing file or non-empty folder only with ``overwrite``. It is written to a
    staging path and renamed into place, so a failed export leaves no partial file and the old target untouched.
    With ``verify`` the written artefact is then compared with the run (``verify.verify``) and the summary saved
    beside it (``NAME.verify.json`` for a GGUF file, ``verify.json`` in a folder)."""
    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"run directory {run} does not exist")
    model_name = default_model(run, model)
    inputs = [run, model_name]
    if format in ("gguf", "ollama") and dtype not in GGUF_DTYPES:
        raise ValueError(f"--dtype {dtype!r}: GGUF export writes one of {', '.join(GGUF_DTYPES)}")
    if format == "gguf":
        target = check_output(output or run.parent / f"{run.name}.{dtype}.gguf", inputs=inputs, overwrite=overwrite,
                              kind="file")
        merged, tokenizer = merged_model(run, model, device)
        result = ExportResult(export_gguf(merged, tokenizer, target, dtype, **_gguf_origin(model_name)))
        against = f"gguf:{result.path}"
    elif format == "ollama":
        target = check_output(output or run.parent / f"{run.name}-ollama", inputs=inputs, overwrite=overwrite)
        merged, tokenizer = merged_model(run, model, device)
        result = export_ollama(merged, tokenizer, target, dtype, gguf_name=f"{run.name}.{dtype}.gguf",
                               **_gguf_origin(model_name))
        against = f"gguf:{target / f'{run.name}.{dtype}.gguf'}"
    elif format == "vllm":
        target = check_output(output or run.parent / f"{run.name}-vllm", inputs=inputs, overwrite=overwrite)
        result = export_vllm(run, target, model, device)
        against = f"vllm:{target}"
    else:
        raise ValueError(f"--format {format!r}: choose gguf, ollama or vllm")
    if verify:
        from .verify import REPORT_NAME
        from .verify import verify as verify_artefact

        report = target / REPORT_NAME if format == "ollama" else None
        result.verification = verify_artefact(run, against, model=model, device=device, output=report)
    return result


def _gguf_origin(model_name: str) -> dict[str, str | None]:
    """``general.name`` and the fallback ``tokenizer.ggml.pre`` for a base model: a GGUF base's own values, else the
    model folder's or hub repository's name and no fallback."""
    source = source_gguf(model_name)
    if source is None:
        return {"name": Path(model_name.rstrip("/")).name, "pre_fallback": None}
    import gguf

    reader = gguf.GGUFReader(str(source))
    values = {k: reader.fields[k].contents() for k in ("general.name", "tokenizer.ggml.pre") if k in reader.fields}
    return {"name": values.get("general.name") or source.stem, "pre_fallback": values.get("tokenizer.ggml.pre")}


def merged_model(run: Path, model: str | None, device: str | None) -> tuple[nn.Module, Any]:
    """The run's adapter folded into float32 base weights (a whole-model run as it is)."""
    base, tokenizer, handle = load_for_inference(default_model(run, model), run, device=device, dtype=torch.float32)
    return (handle.merge_and_unload(torch.float32) if handle is not None else base), tokenizer


# -- GGUF ---------------------------------------------------------------------------------------------------


def export_gguf(model: nn.Module, tokenizer: Any, path: str | Path, dtype: str = "f16", name: str | None = None,
                pre_fallback: str | None = None) -> Path:
    """Write ``model`` (a plain HF Llama / Qwen2 causal LM) and ``tokenizer`` as one GGUF file.

    ``name``: ``general.name`` (default: the model's config name). ``pre_fallback``: the ``tokenizer.ggml.pre`` to
    write when llama.cpp's converter would not recognise this tokenizer (the value in the GGUF the base came from)."""
    import gguf

    arch = model.config.model_type
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"GGUF export supports {', '.join(GGUF_ARCHITECTURES)} models, not {arch!r}")
    path = Path(path)
    with staged_file(path) as tmp:  # write, then rename: a failed or killed export leaves no half file behind
        writer = gguf.GGUFWriter(str(tmp), arch)
        try:
            _write_hparams(writer, model, dtype, name)
            _write_tokenizer(writer, tokenizer, model.get_input_embeddings().weight.shape[0], pre_fallback)
            for name, array, kind in _gguf_tensors(model, dtype):
                writer.add_tensor(name, array, raw_dtype=kind)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return path


def _write_hparams(writer, model: nn.Module, dtype: str, name: str | None = None) -> None:
    import gguf

    cfg = model.config
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"GGUF export writes plain RoPE only; this model uses {rope.get('rope_type')!r} scaling")
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    writer.add_name(name or Path(str(cfg.name_or_path or cfg.model_type)).name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(model.get_input_embeddings().weight.shape[0])
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    writer.add_file_type(file_type)
    if dtype == "q8_0":  # as llama.cpp's llama_model_quantize writes it (its q8_0 tensors match ours byte for byte)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _gguf_tensors(model: nn.Module, dtype: str):
    """``(gguf name, array, GGML type)`` for every weight, under llama.cpp's names and layout."""
    import gguf

    cfg = model.config
    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == cfg.model_type)
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # no output.weight in the file: loaders tie it to token_embd
        stem, _, suffix = hf_name.rpartition(".")
        base = names.get_name(stem)
        if base is None:
            raise ValueError(f"GGUF export: no llama.cpp name for tensor {hf_name!r}")
        data = tensor.detach().float().cpu().numpy()
        if cfg.model_type == "llama" and stem.endswith(("q_proj", "k_proj")):
            kv = cfg.num_attention_heads if stem.endswith("q_proj") else cfg.num_key_value_heads
            data = _llama_permute(data, kv)
        yield f"{base}.{suffix}", *_encode(data, dtype)


def _llama_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's row order for Llama's Q / K (interleaved rotary halves); transformers' loader undoes it."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _encode(data: np.ndarray, dtype: str):
    """The array as stored and its GGML type. 1-D tensors (norms, biases) stay f32, as llama.cpp keeps them; a
    q8_0 row must be a whole number of 32-value blocks, else that tensor is written f16."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    if data.ndim == 1 or dtype == "f32":
        return data.astype(np.float32), Q.F32
    if dtype == "f16" or (dtype == "q8_0" and data.shape[-1] % 32):
        return data.astype(np.float16), Q.F16
    kind = Q.BF16 if dtype == "bf16" else Q.Q8_0
    return quants.quantize(data, kind), kind


def _write_tokenizer(writer, tokenizer: Any, n_vocab: int, pre_fallback: str | None = None) -> None:
    """A byte-level BPE tokenizer as GGUF's ``gpt2`` model: tokens by id, their types, merges, special ids."""
    import json

    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise ValueError(f"GGUF export writes byte-level BPE tokenizers; this one is {spec['model']['type']}")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    special = set(tokenizer.all_special_ids)
    added = {t["id"] for t in spec.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(n_vocab):  # embeddings may have more rows than the tokenizer: llama.cpp wants one token each
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        types.append(gguf.TokenType.CONTROL if i in special else gguf.TokenType.USER_DEFINED if i in added
                     else gguf.TokenType.UNUSED if i not in by_id else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    # llama.cpp picks its pre-tokenizer regex by this name alone; "default" (GPT-2's) splits digits, contractions
    # and symbols unlike most tokenizers, so name it as llama.cpp's converter would (by the probe-text hash).
    writer.add_tokenizer_pre(pretokenizer_name(tokenizer, fallback=pre_fallback))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                           ("pad", tokenizer.pad_token_id), ("unk", tokenizer.unk_token_id)):
        if token_id is not None:
            getattr(writer, f"add_{name}_token_id")(token_id)
    writer.add_add_bos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


# -- Ollama -------------------------------------------------------------------------------------------------

# Ollama's own ChatML template (its template/chatml.gotmpl): each message in its role block, then the assistant's.
OLLAMA_CHATML = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
                 "<|im_start|>assistant\n")
# tuneforge's fallback ChatML (data/template.py) ends an assistant turn with the EOS token instead.
OLLAMA_CHATML_EOS = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}"
                     "{{ if eq .Role \"assistant\" }}EOS{{ else }}<|im_end|>{{ end }}\n{{ end }}"
                     "<|im_start|>assistant\n")


def export_ollama(model: nn.Module, tokenizer: Any, output: str | Path, dtype: str = "f16",
                  gguf_name: str = "model.gguf", name: str | None = None, pre_fallback: str | None = None
                  ) -> ExportResult:
    """A folder Ollama imports: the GGUF and a ``Modelfile`` (``ollama create NAME -f DIR/Modelfile``)."""
    output = Path(output)
    with staged_dir(output) as staging:
        export_gguf(model, tokenizer, staging / gguf_name, dtype, name=name, pre_fallback=pre_fallback)
        (staging / "Modelfile").write_text(modelfile(tokenizer, gguf_name))
    return ExportResult(output, f"ollama create {shlex.quote(output.name)} -f {shlex.quote(str(output / 'Modelfile'))}")


def modelfile(tokenizer: Any, gguf_name: str) -> str:
    """The Modelfile text: FROM the GGUF beside it; for a ChatML-style chat template its Go form (TEMPLATE), the
    default system message the template inserts when a conversation has none (SYSTEM); the stop tokens."""
    lines = ["# tuneforge export --format ollama; import with: ollama create NAME -f Modelfile", f"FROM ./{gguf_name}"]
    template, system = ollama_chatml(tokenizer)
    if template is not None:
        lines.append(f'TEMPLATE """{template}"""')
        if system:
            lines.append(f'SYSTEM """{system}"""')
    else:
        lines.append("# the chat template is not ChatML-style: Ollama reads it from the GGUF's tokenizer.chat_template")
    stops = ["<|im_end|>"] if template is not None else []
    if tokenizer.eos_token and tokenizer.eos_token not in stops:
        stops.append(tokenizer.eos_token)
    lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in stops]
    return "\n".join(lines) + "\n"


def ollama_chatml(tokenizer: Any) -> tuple[str | None, str | None]:
    """``(Go template, default system message or None)`` when the tokenizer's chat template renders conversations
    exactly as ChatML does (an assistant turn may end with EOS instead of ``<|im_end|>``; a system message may be
    added when there is none); ``(None, None)`` otherwise."""
    def chatml(messages: list[dict], assistant_end: str) -> str:
        return "".join(f"<|im_start|>{m['role']}\n{m['content']}"
                       f"{assistant_end if m['role'] == 'assistant' else '<|im_end|>'}\n" for m in messages) + \
            "<|im_start|>assistant\n"

    def render(messages: list[dict]) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    if not tokenizer.chat_template:
        return None, None
    talk = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye."}]
    try:
        rendered = render(talk)
        alone, plain = render(talk[1:2]), chatml(talk[1:2], "")
    except Exception:  # a template that raises on a system turn, or on a lone user turn, is not ChatML
        return None, None
    if rendered == chatml(talk, "<|im_end|>"):
        template = OLLAMA_CHATML
    elif tokenizer.eos_token and '"' not in tokenizer.eos_token and rendered == chatml(talk, tokenizer.eos_token):
        template = OLLAMA_CHATML_EOS.replace("EOS", tokenizer.eos_token)
    else:
        return None, None
    if alone == plain:
        return template, None
    head, end = "<|im_start|>system\n", "<|im_end|>\n"
    prefix = alone[:-len(plain)] if alone.endswith(plain) else ""
    if prefix.startswith(head) and prefix.endswith(end) and '"""' not in prefix:
        return template, prefix[len(head):-len(end)]
    return None, None


# -- vLLM ---------------------------------------------------------------------------------------------------


def export_vllm(run: Path, output: Path, model: str | None = None, device: str | None = None) -> ExportResult:
    """A plain LoRA run: ``output/base`` (the base model) + ``output/adapter`` (PEFT's files), served with
    ``--enable-lora``. Another mergeable run (AdaLoRA, LoRA with trained biases, full fine-tuning): one merged model
    directory. Prompt / prefix / bottleneck adapters: ValueError (vLLM cannot apply them)."""
    saved = read_adapter_config(run) if (run / ADAPTER_CONFIG_NAME).is_file() else None
    lora = saved is not None and batchable_lora(saved)
    if lora:
        base, tokenizer, _ = load_for_inference(default_model(run, model), None, device=device)
    else:
        try:
            base, tokenizer = merged_model(run, model, device)
        except ValueError as e:
            raise ValueError(f"{run}: vLLM serves whole models and LoRA adapters only ({e}); serve this adapter "
                             "with `tuneforge serve --adapter NAME=DIR` instead") from None
    # The folder is built aside and replaces the target whole: no stale model files mixed with the new layout.
    with staged_dir(output) as staging:
        if not lora:
            base.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
        else:
            base.save_pretrained(staging / "base", safe_serialization=True)
            tokenizer.save_pretrained(staging / "base")
            (staging / "adapter").mkdir()
            for name in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME):
                shutil.copy2(run / name, staging / "adapter" / name)
    if not lora:
        return ExportResult(output, f"vllm serve {shlex.quote(str(output))}")
    command = (f"vllm serve {shlex.quote(str(output / 'base'))} --enable-lora --max-lora-rank "
               f"{_vllm_rank(int(saved['r']))} --lora-modules {shlex.quote(run.name + '=' + str(output / 'adapter'))}")
    return ExportResult(output, command)


def _vllm_rank(rank: int) -> int:
    """vLLM's --max-lora-rank takes one of a few sizes; the smallest that holds ``rank``."""
    return next((size for size in (8, 16, 32, 64, 128, 256, 320, 512) if size >= rank), rank)


__all__ = ["ExportResult", "GGUF_ARCHITECTURES", "OLLAMA_CHATML", "export", "export_gguf", "export_ollama",
           "export_vllm", "merged_model", "modelfile", "ollama_chatml"]
