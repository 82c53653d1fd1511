"""Instruction tuning for generation tasks: summaries, translation, product descriptions,
customer-support answers.

Rows are chat ``messages`` ([{role, content}, ...], the last one the assistant's answer),
ShareGPT ``conversations`` ([{from, value}, ...]: human -> user, gpt -> assistant; with an
optional ``system`` column) or ``instruction`` / ``input`` / ``output`` columns (turned into
a user turn and an assistant turn, the Alpaca layout). Examples are rendered with the
model's own chat template; the loss covers the response tokens only (the prompt's labels
are -100). After training, the base and the fine-tuned model generate an answer for every
test prompt (greedy), scored against the reference with BLEU (sacrebleu) and ROUGE-L F1
(rouge-score); the generations are kept so that the report can show them side by side.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd

from domaintune.chat import encode_conversation, fit_prompt
from domaintune.errors import DataError, ModelError
from domaintune.evidence import ExampleStats, mean_stats, rowwise
from domaintune.generation import GenerationSettings, generate_texts
from domaintune.readers.sources import load_json
from domaintune.tasktypes import register_task_type
from domaintune.tasktypes.base import SMOLLM2, TaskType, TokenizeSettings, require_columns

#: ShareGPT's column of turns, read when data.messages_column is absent, and LLaMA-Factory's
#: column of a conversation's system prompt beside it
#: the columns tokenize adds about fitting an example into training.max_length
_CUT_COLUMNS = ("prompt_cut", "answer_cut", "answer_tokens")
CONVERSATIONS = "conversations"
SYSTEM = "system"
#: a turn's speaker (ShareGPT's ``from``, or ``role``), lower-cased -> its chat role; other
#: speakers (function_call, observation, tool) keep their name for the contract to report
ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "system": "system",
}


def turns_column(columns: Any, messages_column: str) -> str | None:
    """The column holding conversations: data.messages_column, else ShareGPT's
    ``conversations``; None when neither is there."""
    if messages_column in columns:
        return messages_column
    return CONVERSATIONS if CONVERSATIONS in columns else None


def chat_turn(turn: Any) -> Any:
    """A turn as ``{role, content}``: OpenAI's ``{role, content}`` or ShareGPT's
    ``{from, value}``, mixed freely; a speaker name becomes its chat role (``ROLES``)."""
    if not isinstance(turn, dict):
        return turn
    role = turn.get("role", turn.get("from"))
    if isinstance(role, str):
        role = ROLES.get(role.strip().lower(), role)
    out = {k: v for k, v in turn.items() if k not in ("from", "value")}
    out["role"] = role
    out["content"] = turn["content"] if "content" in turn else turn.get("value")
    return out


def messages_from_row(
    row: dict[str, Any], has_messages: bool, cols: dict[str, str]
) -> list[dict] | None:
    """A row's conversation: its turns (``cols["messages"]``; with ``cols["system"]``, that
    column's system prompt first), or an instruction (+ input) and its output."""
    if has_messages:
        value = row[cols["messages"]]
        if isinstance(value, str):
            try:
                value = load_json(value)
            except (ValueError, DataError):  # not JSON, or nested too deep: no messages
                return None
        if value is None or not isinstance(value, list | tuple | np.ndarray):
            return None
        turns = [chat_turn(m) for m in value]
        system = row.get(cols.get("system", ""))
        if isinstance(system, str) and system.strip():
            turns.insert(0, {"role": "system", "content": system})
        return turns
    instruction, extra, output = (row.get(cols[k]) for k in ("instruction", "input", "output"))
    if instruction is None or (isinstance(instruction, float) and np.isnan(instruction)):
        return None
    prompt = str(instruction)
    if isinstance(extra, str) and extra.strip():
        prompt += "\n\n" + extra
    answer = (
        None if output is None or (isinstance(output, float) and np.isnan(output)) else str(output)
    )
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def rouge_l_scores(predictions: list[str], references: list[str]) -> list[float]:
    """Each example's ROUGE-L F1 (rouge-score, with stemming) of its answer against its
    reference: the rougeL metric is their mean."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [
        scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)
    ]


def corpus_statistics(metric: Any, predictions: list[str], references: list[str]) -> ExampleStats:
    """A sacrebleu corpus metric (a ``BLEU`` or ``CHRF`` object) as per-sentence sufficient
    statistics: the counts sacrebleu itself sums over a corpus before scoring it (what its
    own paired bootstrap resamples), and a ``combine`` that scores summed counts with
    sacrebleu's code, on a 0-1 scale. Summed over all sentences, they give
    ``corpus_bleu`` / ``corpus_chrf`` exactly."""
    rows = metric._extract_corpus_statistics(predictions or [""], [references or [""]])
    values = np.asarray(rows, dtype=np.float64)
    if not predictions:
        values = values[:0]

    def score(sums: np.ndarray) -> float:
        counts = [int(round(x)) for x in sums]
        return float(metric._compute_score_from_stats(counts).score) / 100.0

    return ExampleStats(values, rowwise(score))


def prompt_ids(tokenizer: Any, messages: list[dict], budget: int) -> list[int]:
    """The token ids of a conversation up to the assistant's next turn (the model's chat
    template with its generation header), cut to at most ``budget`` tokens as training cuts
    prompts (domaintune.chat): what the model answers."""
    return fit_prompt(tokenizer, messages, budget)[0]


def stored_messages(value: Any) -> list | None:
    """A row's ``messages`` as ingest stored them (JSON text; a missing one reads back as
    None or NaN)."""
    return json.loads(value) if isinstance(value, str) else None


def _answer(messages: list | None) -> str | None:
    """The reference answer: the last message's content, where it is text (anything else
    is no answer; the contract names the message)."""
    last = messages[-1] if messages else None
    content = last.get("content") if isinstance(last, dict) else None
    return content if isinstance(content, str) else None


def messages_error(messages: list[dict] | None) -> str:
    """'' for a usable conversation, else what is wrong with it."""
    if not messages:
        return "no messages"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"message {i + 1}: not a {{role, content}} object"
        if m.get("role") not in ("system", "user", "assistant"):
            return f"message {i + 1}: unknown role {m.get('role')!r}"  # the rule lists the roles
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            return f"message {i + 1} ({m.get('role')}): empty content"
    if messages[-1]["role"] != "assistant":
        return "the last message must be the assistant's answer"
    if not any(m["role"] == "user" for m in messages[:-1]):
        return "no user message before the answer"
    return ""


@register_task_type
class InstructionTuning(TaskType):
    name = "instruction_tuning"
    metrics = ("rougeL", "bleu")
    default_model = SMOLLM2
    contract = "instruction_tuning"
    auto_model = "AutoModelForCausalLM"
    raw_columns = ("messages", "text", "reference")
    model_columns = ("input_ids", "attention_mask", "labels")
    target_column = "reference"
    generative = True
    #: the whole conversation: two answers to one prompt are two examples
    duplicate_key = ("messages",)

    # -- ingest ---------------------------------------------------------------
    def map_columns(self, df: pd.DataFrame, config: Any, where: str) -> pd.DataFrame:
        d = config.data
        cols = {
            "messages": d.messages_column,
            "instruction": d.instruction_column,
            "input": d.input_column,
            "output": d.output_column,
        }
        turns = turns_column(df.columns, cols["messages"])
        if turns == CONVERSATIONS:  # ShareGPT (LLaMA-Factory: a system column beside it)
            cols.update(messages=CONVERSATIONS, system=SYSTEM)
        if turns is None:
            required = {role: cols[role] for role in ("instruction", "output")}
            what = f"no {cols['messages']!r} or {CONVERSATIONS!r} column and no "
            require_columns(df, required, where, what=what)
        has_messages = turns is not None
        messages = [messages_from_row(r, has_messages, cols) for r in df.to_dict("records")]
        return pd.DataFrame(
            {
                "messages": [
                    None if m is None else json.dumps(m, ensure_ascii=False) for m in messages
                ],
                "text": [
                    None
                    if not m
                    else "\n".join(str(x.get("content")) for x in m[:-1] if isinstance(x, dict))
                    for m in messages
                ],
                "reference": [_answer(m) for m in messages],
                "_row": df["_row"],
                "_source": df["_source"],
            }
        )

    def columns_read(self, df: pd.DataFrame, config: Any, where: str) -> set[str]:
        if turns_column(df.columns, config.data.messages_column) == CONVERSATIONS:
            return {CONVERSATIONS, SYSTEM}
        return set()

    def label_counts(self, df: pd.DataFrame) -> dict[str, int]:
        return {"conversations": int(df["messages"].notna().sum())}

    # -- validate -------------------------------------------------------------
    def contract_tables(
        self, df: pd.DataFrame, labels: list[str], config: Any = None
    ) -> dict[str, pd.DataFrame]:
        rows = df.copy()
        rows["_messages_error"] = rows["messages"].map(lambda m: messages_error(stored_messages(m)))
        key = rows["messages"]
        rows["_is_duplicate"] = (key.duplicated(keep="first") & key.notna()).astype(float)
        return {"rows": rows.drop(columns=["messages"])}

    # -- preprocess -----------------------------------------------------------
    def usable_rows(self, df: pd.DataFrame, labels: list[str]) -> pd.DataFrame:
        ok = df["messages"].map(
            lambda m: isinstance(m, str) and messages_error(json.loads(m)) == ""
        )
        return df[ok]

    def clean(self, df: pd.DataFrame, config: Any) -> pd.DataFrame:
        return df

    def check_tokenizer(self, tokenizer: Any, settings: Any) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ModelError(
                "model.name_or_path: the tokenizer has no chat template; rule: instruction_tuning renders examples with it"
            )

    def tokenize(
        self, batch: dict[str, list], tokenizer: Any, settings: TokenizeSettings, labels: list[str]
    ) -> dict[str, list]:
        """Each conversation fitted into ``max_length`` by domaintune.chat's rule (the
        answer never cut to nothing, the prompt cut where it loses least), labels on the
        assistant turns; which examples were cut and each answer's length in tokens (what
        ``evaluation.max_new_tokens: auto`` is derived from) are kept beside them."""
        keys = ("input_ids", "attention_mask", "labels", "length")
        out: dict[str, list] = {k: [] for k in (*keys, *_CUT_COLUMNS)}
        for raw in batch["messages"]:
            enc = encode_conversation(tokenizer, json.loads(raw), settings.max_length)
            out["input_ids"].append(enc.input_ids)
            out["attention_mask"].append([1] * len(enc.input_ids))
            out["labels"].append(enc.labels)
            out["length"].append(len(enc.input_ids))
            out["prompt_cut"].append(enc.prompt_cut)
            out["answer_cut"].append(enc.answer_cut)
            out["answer_tokens"].append(enc.answer_tokens)
        for k in ("messages", "text", "reference", "_row", "_source", "_example"):
            out[k] = batch[k]
        return out

    def split_stats(self, ds: Any) -> dict[str, Any]:
        """What fitting into ``max_length`` cut, and the answers' lengths in tokens."""
        answers = np.asarray(ds["answer_tokens"], dtype=float)
        prompt_cut = np.asarray(ds["prompt_cut"], dtype=bool)
        answer_cut = np.asarray(ds["answer_cut"], dtype=bool)
        return {
            "truncated_share": float((prompt_cut | answer_cut).mean()),
            "prompt_cut_share": float(prompt_cut.mean()),
            "answer_cut_share": float(answer_cut.mean()),
            "answer_tokens": {
                q: int(np.percentile(answers, p))
                for q, p in (("p50", 50), ("p95", 95), ("p99", 99), ("max", 100))
            },
        }

    # -- train / evaluate ------------------------------------------------------
    def collator(self, tokenizer: Any, settings: Any = None) -> Any:
        from transformers import DataCollatorForSeq2Seq

        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return DataCollatorForSeq2Seq(
            tokenizer, padding=True, label_pad_token_id=-100, pad_to_multiple_of=8
        )

    def padding_free_collator(self, tokenizer: Any) -> Any:
        """A batch's examples end to end in one row, positions restarting at each, with the
        sequence boundaries for the attention kernels (no attention crosses examples:
        domaintune.training.attention on CPU, FlashAttention-2 or a block-diagonal mask
        elsewhere); an example's first label is -100, so no example learns the next one's
        first token."""
        from transformers import DataCollatorWithFlattening

        return DataCollatorWithFlattening(return_flash_attn_kwargs=True)

    def metric_for_best_model(self, primary: str) -> tuple[str, bool]:
        return "loss", False  # generation metrics are computed after training, on the test split

    def compute_metrics(
        self, predictions: Any, references: Any, labels: list[str]
    ) -> dict[str, Any]:
        import sacrebleu

        preds = [str(p) for p in predictions]
        refs = [str(r) for r in references]
        bleu = sacrebleu.corpus_bleu(preds, [refs]).score / 100.0 if preds else 0.0
        rouge = rouge_l_scores(preds, refs)
        return {"rougeL": float(np.mean(rouge)) if rouge else 0.0, "bleu": float(bleu)}

    def example_statistics(
        self, predictions: pd.DataFrame, metric: str, labels: list[str]
    ) -> ExampleStats | None:
        """From each example's ``reference`` and ``predicted`` answer: rougeL (a mean of
        per-example ROUGE-L F1) [score, 1]; bleu (corpus BLEU) sacrebleu's per-sentence
        sufficient statistics [hypothesis length, reference length, matching n-grams and
        n-grams of orders 1-4], combined by sacrebleu into the corpus figure, so a resample
        is scored as corpus BLEU is (not as a mean of sentence BLEU)."""
        preds = [str(p) for p in predictions["predicted"]]
        refs = [str(r) for r in predictions["reference"]]
        if metric == "rougeL":
            return mean_stats(rouge_l_scores(preds, refs))
        if metric == "bleu":
            from sacrebleu.metrics import BLEU

            return corpus_statistics(BLEU(), preds, refs)
        return None

    def trainer_metrics(self, eval_pred: Any, labels: list[str]) -> dict[str, float]:
        raise NotImplementedError("instruction_tuning checkpoints are picked by validation loss")

    def score_split(
        self,
        model: Any,
        tokenizer: Any,
        split_path: str,
        labels: list[str],
        batch_size: int,
        settings: Any = None,
        generation: GenerationSettings | None = None,
        on_batch: Any = None,
    ) -> tuple[dict[str, Any], pd.DataFrame]:
        """Greedy answers to the split's prompts (cut to ``generation.max_prompt_tokens`` by
        training's rule), scored against the references; ``generation.prompts_cut``: the share
        of prompts that were cut."""
        table = pd.read_parquet(
            split_path, columns=["messages", "text", "reference", "_row", "_source"]
        )
        generation = generation or GenerationSettings(batch_size=batch_size)
        prompts, cut = [], []
        for raw in table["messages"]:
            ids, was_cut, _ = fit_prompt(
                tokenizer, json.loads(raw)[:-1], generation.max_prompt_tokens
            )
            prompts.append(ids)
            cut.append(was_cut)
        outputs = generate_texts(model, tokenizer, prompts, generation, on_batch)
        metrics = self.compute_metrics(outputs, table["reference"].tolist(), labels)
        metrics["generation"] = {"prompts_cut": float(np.mean(cut)) if cut else 0.0}
        result = table.drop(columns=["messages"]).rename(columns={"text": "prompt"})
        result["predicted"] = outputs
        return metrics, result.reset_index(drop=True)

    # -- predict ---------------------------------------------------------------
    def predict_inputs(self, model: Any, text_column: str) -> list[tuple[str, tuple[str, ...]]]:
        """A column of chat messages (or ShareGPT ``conversations``), of instructions, or
        of prompts (the text column)."""
        names = (
            model.column("messages_column"),
            "conversations",
            model.column("instruction_column"),
            text_column,
        )
        return [("prompt", names)]

    def predict(self, model: Any, table: pd.DataFrame, text_column: str, load: Any) -> pd.DataFrame:
        """``generated``: the model's greedy answer to each row's conversation."""
        return generate_answers(model, table, self._conversations(model, table, text_column), load)

    def prediction_counts(self, result: pd.DataFrame) -> dict[str, int]:
        return {"prompts": len(result), "empty": int((result["generated"] == "").sum())}

    def _conversations(self, model: Any, table: pd.DataFrame, text_column: str) -> list[list]:
        """Each row's conversation up to the answer: its chat turns (``data.messages_column`` or
        ShareGPT ``conversations``; a closing assistant message is the reference, left out), an
        instruction (+ input), or a prompt in the text column."""
        names = {
            k: model.column(f"{k}_column") for k in ("messages", "instruction", "input", "output")
        }
        turns = turns_column(table.columns, names["messages"])
        if turns is not None:
            names.update(messages=turns, system="system")
        has_instruction = names["instruction"] in table.columns
        out = []
        for row in table.to_dict("records"):
            if turns is not None or has_instruction:
                messages = messages_from_row(row, turns is not None, names) or []
            else:
                text = row.get(text_column)
                messages = (
                    []
                    if text is None or pd.isna(text)
                    else [{"role": "user", "content": str(text)}]
                )
            messages = [m for m in messages if isinstance(m, dict)]
            if messages and messages[-1].get("role") == "assistant":
                messages = messages[:-1]
            out.append(messages)
        return out


def predict_generation_settings(model: Any) -> GenerationSettings:
    """How ``model`` generates: its run's ``evaluation.max_new_tokens`` (auto: the value
    derived from its training answers, in its ``generation_config.json``) and prompts cut to
    the room its training left them, in batches of ``--batch-size``: as its evaluation."""
    from domaintune.chat import prompt_budget

    wanted = model.config.evaluation.max_new_tokens if model.config is not None else "auto"
    if wanted == "auto":
        saved = model.model_dir / "generation_config.json"
        doc = json.loads(saved.read_text()) if saved.is_file() else {}
        wanted = doc.get("max_new_tokens") or 128
    return GenerationSettings(
        max_new_tokens=int(wanted),
        batch_size=model.batch_size,
        max_prompt_tokens=prompt_budget(model.max_length, int(wanted)),
    )


def generate_answers(
    model: Any, table: pd.DataFrame, conversations: list[list], load: Any
) -> pd.DataFrame:
    """``table`` with ``generated``: the model's greedy answer to each conversation, rendered
    with its chat template and cut to fit as training cut prompts (domaintune.chat), generated
    as its evaluation generated."""
    from domaintune.errors import PredictError
    from domaintune.generation import cast_for_generation
    from domaintune.inference import autocast_for
    from domaintune.progress import Progress
    from domaintune.tasktypes.predicting import log

    tokenizer, net, precision = load()
    if not getattr(tokenizer, "chat_template", None):
        raise PredictError(
            f"{model.reference}: the model's tokenizer has no chat template; rule: "
            f"{model.task_type} prompts are rendered with it"
        )
    cast_for_generation(net, precision)  # as evaluation generates
    settings = predict_generation_settings(model)
    prompts, empty = [], []
    for i, messages in enumerate(conversations):
        if not any(m.get("role") == "user" for m in messages):
            empty.append(i)
            messages = [{"role": "user", "content": ""}]
        prompts.append(prompt_ids(tokenizer, messages, settings.max_prompt_tokens))
    progress = Progress(len(prompts), "predict", unit="answers", logger=log)
    with autocast_for(net, precision):
        generated = generate_texts(net, tokenizer, prompts, settings, progress.advance)
    progress.close()
    for i in empty:
        generated[i] = ""
    if empty:
        model.notes.append(f"{len(empty)} row(s) had no prompt: nothing generated")
    out = table.copy()
    out["generated"] = generated
    return out
