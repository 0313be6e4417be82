"""``tuneforge export RUN --format gguf|ollama|vllm``: a run written for another runtime, then verified against it."""

from __future__ import annotations


def add_subcommands(sub) -> None:
    p = sub.add_parser("export", help="write a run for another runtime: GGUF (llama.cpp), an Ollama folder (GGUF + "
                       "Modelfile) or vLLM's layout; then verify it against the run (tuneforge verify)")
    p.add_argument("run", help="the run / adapter directory (or a whole-model directory)")
    p.add_argument("--format", required=True, choices=["gguf", "ollama", "vllm"])
    p.add_argument("--output", help="file (gguf) or directory (ollama, vllm); default beside the run")
    p.add_argument("--dtype", default="f16", choices=["f16", "bf16", "f32", "q8_0"], help="GGUF tensor type")
    p.add_argument("--model", help="base model (default: the one the run was trained on)")
    p.add_argument("--device")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--no-verify", action="store_true", help="skip comparing the artefact with the run (agreement, "
                   "KL, tokenizer; summary in verify.json beside it); a failed check exits 1")
    p.set_defaults(func=run_export)


def run_export(args) -> int:
    from ..artifacts.export import export

    result = export(args.run, args.format, output=args.output, dtype=args.dtype, model=args.model, device=args.device,
                    overwrite=args.overwrite, verify=not args.no_verify)
    print(result.summary())
    return 0 if result.passed else 1
