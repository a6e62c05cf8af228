"""The collaborative prompt and the Alpaca task template.

The prompt tells the model, in plain words, that it is being pruned and should keep its quality
(docs/method.md §9; the wording here is this project's own). Training stages use the present-tense
text; evaluation uses a past-tense variant, because by then the pruning is done. A recipe can replace
either with any literal text or switch the prompt off with 'none'.
"""

from __future__ import annotations

from typing import Literal

from compresso_ops.recipe.schema import PromptSection

Stage = Literal["prune", "finetune", "evaluate"]

COLLABORATIVE = (
    "Note to the assistant: a pruning procedure is currently compressing you by deleting parameters that "
    "add little to your answers. This makes you cheaper and faster to run on limited hardware. The removal "
    "happens step by step, with training in between so you can adjust. Please work with it: keep your "
    "answers accurate, helpful and well written, exactly as you would at full size."
)

COLLABORATIVE_EVAL = (
    "Note to the assistant: a pruning procedure has compressed you by deleting parameters that added "
    "little to your answers, so that you are cheaper and faster to run on limited hardware. It removed them "
    "step by step, with training in between so you could adjust. Please keep your answers accurate, helpful "
    "and well written, exactly as you would at full size."
)

def _expand(text: str, stage: Stage) -> str:
    if text == "none":
        return ""
    if text == "collaborative":
        return COLLABORATIVE_EVAL if stage == "evaluate" else COLLABORATIVE
    return text


def resolve_prompt(section: PromptSection, stage: Stage) -> str:
    """The prompt text that starts every input of `stage` ("" when the recipe does not use it there)."""
    if stage not in section.use_in:
        return ""
    if stage == "evaluate" and section.eval_text is not None:
        return _expand(section.eval_text, stage)
    return _expand(section.text, stage)


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """The task part of an Alpaca example, ending where the response begins."""
    if input_text.strip():
        return (
            "Below is an instruction that describes a task, paired with an input that provides further context. "
            "Write a response that appropriately completes the request.\n\n"
            f"### Instruction:\n{instruction}\n\n### Input:\n{input_text}\n\n### Response:\n"
        )
    return (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        f"request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
    )


def with_prompt(prompt: str, body: str) -> str:
    """Prompt first, then the task text, separated by a blank line."""
    return f"{prompt}\n\n{body}" if prompt else body
