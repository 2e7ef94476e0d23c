"""Prompt templates: the conventions of LLaVA-1.5 / lmms-eval, recorded with every sample.

A template is a `str.format` string over the sample's prompt fields; `--prompt-template` replaces it.
"""

from __future__ import annotations

from ..errors import ConfigError

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
LETTER_ANSWER = "\nAnswer with the option's letter from the given choices directly."

QUESTION_ONLY_TEMPLATE = "{question}"
SHORT_ANSWER_TEMPLATE = "{question}" + SHORT_ANSWER
# {context} is "Context: <hint>\n" or "" (ScienceQA); {hint} is "<hint>\n" or "" (MMBench);
# {options} is "A. first\nB. second...".
SCIENCEQA_TEMPLATE = "{context}{question}\n{options}" + LETTER_ANSWER
MMBENCH_TEMPLATE = "{hint}{question}\n{options}" + LETTER_ANSWER


def format_options(options: dict[str, str]) -> str:
    return "\n".join(f"{letter}. {text}" for letter, text in options.items())


def render(template: str, fields: dict) -> str:
    try:
        return template.format(**fields)
    except (KeyError, IndexError) as exc:
        raise ConfigError(
            f"prompt template {template!r} uses an unknown field {exc}; this task offers "
            + ", ".join("{" + name + "}" for name in fields)
        ) from None
