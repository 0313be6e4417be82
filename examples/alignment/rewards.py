"""A verifiable reward for the date-normalisation demo, for ``--ppo-reward-function``.

``tuneforge train --objective ppo --ppo-reward-function examples/alignment/rewards.py:date_reward`` calls
``date_reward(prompts, completions, answer=[...])``: ``answer`` is each prompt record's reference date
(``examples/alignment/data/prompts_*.jsonl``), passed as a keyword by ``call_reward_function``.
"""

from __future__ import annotations

import re

ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def date_score(completion: str, answer: str) -> float:
    """1.0 for exactly the reference date; 0.5 for some other ``YYYY-MM-DD`` string (right form, wrong date);
    0.0 otherwise. Partial credit gives PPO a gradient towards the format before the model gets dates right."""
    text = completion.strip()
    if text == answer.strip():
        return 1.0
    return 0.5 if ISO_DATE.fullmatch(text) else 0.0


def date_reward(prompts: list[str], completions: list[str], answer: list[str], **_) -> list[float]:
    return [date_score(c, a) for c, a in zip(completions, answer)]
