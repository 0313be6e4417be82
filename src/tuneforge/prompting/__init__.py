"""The prompt-engineering side of tuneforge: hard prompt templates, prompt evaluation, and training data
written by a teacher model.

    from tuneforge.prompting import load_template, evaluate_prompts
    results = evaluate_prompts(model, tok, [load_template("zero_shot"), load_template("few_shot")], records)

    from tuneforge.prompting import TeacherClient, SynthConfig, read_topics, synthesize
    teacher = TeacherClient("http://127.0.0.1:8000/v1", "my-teacher", api_key=os.environ["OPENAI_API_KEY"])
    summary = synthesize(read_topics("topics.txt"), teacher, SynthConfig(output=Path("synth.jsonl"), count=200))
"""

from .evaluate import PromptEvalResult, evaluate_prompts, format_table
from .fewshot import PromptBuilder, TfidfIndex
from .filters import DuplicateIndex, ReplyFormatError, parse_judge_score, parse_qa_reply
from .jsonl import JsonlLog
from .metrics import contains_match, exact_match, load_metric, normalize_answer, regex_metric
from .sources import Job, Source, chunk_text, plan_jobs, read_documents, read_topics
from .synth import SynthConfig, SynthSummary, output_format_instructions, synthesize
from .teacher import LocalTeacher, TeacherClient, TeacherConfigError, TeacherRequestError
from .template import FewShot, PromptTemplate, TemplateError, builtin_template_names, load_template

__all__ = [
    "PromptTemplate", "FewShot", "TemplateError", "load_template", "builtin_template_names", "PromptBuilder",
    "TfidfIndex", "evaluate_prompts", "PromptEvalResult", "format_table", "load_metric", "normalize_answer",
    "exact_match", "contains_match", "regex_metric", "TeacherClient", "LocalTeacher", "TeacherRequestError",
    "TeacherConfigError", "SynthConfig", "SynthSummary", "synthesize", "output_format_instructions", "Source",
    "Job", "read_topics", "read_documents", "chunk_text", "plan_jobs", "DuplicateIndex", "parse_qa_reply",
    "parse_judge_score", "ReplyFormatError", "JsonlLog",
]
