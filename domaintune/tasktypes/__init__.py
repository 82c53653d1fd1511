"""Task types are plug-ins behind one small interface (see ``base.TaskType``).

A new task type is one module here plus one contract in ``data_contracts/``.
"""

from __future__ import annotations

from domaintune.errors import ConfigError
from domaintune.tasktypes.base import TaskType


def get_task_type(name: str) -> TaskType:
    if name == "text_classification":
        from domaintune.tasktypes.text_classification import TextClassification

        return TextClassification()
    if name == "token_classification":
        from domaintune.tasktypes.token_classification import TokenClassification

        return TokenClassification()
    if name == "question_answering":
        from domaintune.tasktypes.question_answering import QuestionAnswering

        return QuestionAnswering()
    if name == "instruction_tuning":
        from domaintune.tasktypes.instruction_tuning import InstructionTuning

        return InstructionTuning()
    if name == "causal_lm":
        from domaintune.tasktypes.causal_lm import CausalLM

        return CausalLM()
    if name == "masked_lm":
        from domaintune.tasktypes.masked_lm import MaskedLM

        return MaskedLM()
    raise ConfigError(
        f"task.type: unknown task type {name!r}; allowed: text_classification, "
        "token_classification, question_answering, causal_lm, masked_lm, instruction_tuning"
    )


__all__ = ["TaskType", "get_task_type"]
