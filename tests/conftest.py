"""Shared fixtures: an offline, isolated environment, tiny real models, and real-ish data.

Everything is real: tokenizers are trained on the fly with `tokenizers`, models are tiny BERTs
built from a config and saved in Hugging Face format, Prefect runs against a temporary local
server, Great Expectations validates for real and training goes through the DeepSpeed launcher.
"""

from __future__ import annotations

import csv
import json
import os
import random
import tempfile
from collections import Counter
from pathlib import Path

import pytest

_SESSION_TMP = Path(tempfile.mkdtemp(prefix="domaintune-tests-"))


def pytest_configure(config):
    # Must happen before Prefect, GX or transformers are imported anywhere.
    os.environ["PREFECT_HOME"] = str(_SESSION_TMP / "prefect-home")
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ.pop("PREFECT_API_URL", None)  # never talk to a developer's real server
    os.environ["GX_ANALYTICS_ENABLED"] = "false"
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_HOME"] = str(_SESSION_TMP / "hf-home")
    os.environ["HF_DATASETS_CACHE"] = str(_SESSION_TMP / "hf-datasets")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ.setdefault(
        "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "domaintune" / "torch_extensions")
    )
    os.environ["DOMAINTUNE_CACHE"] = str(_SESSION_TMP / "domaintune-cache")
    from domaintune.environment import configure_environment

    configure_environment()


# ----------------------------------------------------------------------------- data

WORDS = {
    "positive": "growth profit record gain strong beat rises upgrade boost surge win robust".split(),
    "negative": "loss decline weak cut falls warning miss drop layoffs slump debt plunge".split(),
    "neutral": "meeting announced scheduled report quarter statement office located annual plans".split(),
}
FILLER = "the company said its shares in market on for a of to with by from this year".split()
LABELS = ["negative", "neutral", "positive"]


def make_rows(n_per_class: int, seed: int = 0, labels: list[str] | None = None) -> list[dict]:
    """Distinct short texts whose label is learnable from class-specific words."""
    rng = random.Random(seed)
    rows, seen = [], set()
    for label in labels or LABELS:
        made = 0
        while made < n_per_class:
            words = rng.sample(WORDS[label], 3) + rng.sample(FILLER, rng.randint(3, 7))
            rng.shuffle(words)
            text = " ".join(words).capitalize() + "."
            if text in seen:
                continue
            seen.add(text)
            rows.append({"text": text, "label": label})
            made += 1
    rng.shuffle(rows)
    return rows


def write_csv(path: Path, rows: list[dict], columns=("text", "label"), encoding="utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding=encoding) as f:
        w = csv.DictWriter(f, fieldnames=list(columns))
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c) for c in columns})
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def rows():
    return make_rows


# --------------------------------------------------------------------------- models


_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _wordpiece_vocab(words: Counter, vocab_size: int) -> dict[str, int]:
    """The same vocabulary in every process: special tokens, every character alone and as a
    word-inner piece, then whole words by frequency (ties alphabetical), up to vocab_size.

    `tokenizers`' WordPiece trainer breaks ties between equally frequent merges in hash order,
    which differs from process to process; the tiny model's embeddings then meet different
    ids in each test session, and marginal results came and went with it."""
    chars = sorted({c for w in words for c in w})
    pieces = [*_SPECIAL_TOKENS, *chars, *(f"##{c}" for c in chars)]
    whole = sorted((w for w in words if len(w) > 1), key=lambda w: (-words[w], w))
    return {t: i for i, t in enumerate([*pieces, *whole][:vocab_size])}


def build_tiny_model(
    out: Path, vocab_size: int = 300, seed: int = 0, extra_words: str = ""
) -> Path:
    """A tiny BERT encoder plus a WordPiece tokenizer trained here, saved like a hub model."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, BertTokenizerFast

    corpus = [r["text"] for r in make_rows(40, seed=99)] + [extra_words]
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words = Counter(
        word
        for text in corpus
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
    )
    tok = Tokenizer(models.WordPiece(_wordpiece_vocab(words, vocab_size), unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = normalizer, pre_tokenizer
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    fast = BertTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=128,
    )
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    model = BertModel(cfg)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    return build_tiny_model(_SESSION_TMP / "tiny-bert")


@pytest.fixture(scope="session")
def other_tokenizer_model() -> Path:
    """Same architecture, a tokenizer whose vocabulary has two more words (other ids)."""
    return build_tiny_model(
        _SESSION_TMP / "tiny-bert-other", vocab_size=200, extra_words="zebra quasar"
    )


# --------------------------------------------------------------------------- config


def merge_sections(defaults: dict, overrides: dict) -> dict:
    """A task's test defaults with a test's overrides merged in, one section deep."""
    out = dict(defaults)
    for k, v in overrides.items():
        out[k] = {**out.get(k, {}), **v} if isinstance(v, dict) else v
    return out


#: training that the tiny model learns the synthetic rows with, in seconds
TINY_TRAINING = {
    "epochs": 8,
    "learning_rate": 5e-3,
    "batch_size": 8,
    "max_length": 32,
    "early_stopping_patience": None,
}
TINY_EVALUATION = {"test_size": 0.2, "val_size": 0.15}


@pytest.fixture
def make_config(tmp_path, tiny_model):
    """Build a validated RetrainConfig for the tiny model on a given data source."""
    from domaintune.runconfig import load_config

    def _make(source, **sections):
        data = {
            "name": "test-uc",
            "domain": "finance",
            "task": {"type": "text_classification", "labels": LABELS},
            "data": {"source": None if source is None else str(source)},
            "model": {"name_or_path": str(tiny_model)},
            "training": {
                **TINY_TRAINING,
                "seed": 7,
                "warmup_ratio": 0.0,
                "logging_steps": 5,
            },
            "evaluation": TINY_EVALUATION,
            "retries": {"count": 0, "delay_seconds": 0},
            "store": {"root": str(tmp_path / "store")},
        }
        for section, values in sections.items():
            if isinstance(values, dict) and isinstance(data.get(section), dict):
                data[section] = {**data[section], **values}
            else:
                data[section] = values
        return load_config(data=data)

    return _make


@pytest.fixture(scope="session")
def prefect_server():
    """A real temporary Prefect server (SQLite) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


# ------------------------------------------------------------------------ NER data

PEOPLE = [
    "Anna Berg",
    "Tom Hale",
    "Mia Stone",
    "Omar Reyes",
    "Lena Park",
    "Ivan Petrov",
    "Sara Cole",
]
ORGS = ["Acme Corp", "Globex", "Initech", "Umbrella Bank", "Nordic Mining", "Vortex Labs"]
PLACES = ["Oslo", "Lagos", "Lima", "New York", "Cairo", "Hanoi"]
TEMPLATES = [
    "{PER} joined {ORG} in {LOC} .",
    "{ORG} hired {PER} last week .",
    "Shares of {ORG} rose in {LOC} trading .",
    "{PER} met investors from {ORG} .",
    "The office in {LOC} belongs to {ORG} .",
    "Analysts in {LOC} praised {PER} .",
]


def make_ner_sentences(n: int, seed: int = 0) -> list[dict]:
    """Distinct sentences with IOB2 tags for PER, ORG and LOC."""
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        template = rng.choice(TEMPLATES)
        tokens, tags = [], []
        for part in template.split():
            if part.startswith("{"):
                etype = part[1:-1]
                name = rng.choice({"PER": PEOPLE, "ORG": ORGS, "LOC": PLACES}[etype])
                words = name.split()
                tokens += words
                tags += [f"B-{etype}"] + [f"I-{etype}"] * (len(words) - 1)
            else:
                tokens.append(part)
                tags.append("O")
        key = " ".join(tokens)
        if key in seen:
            continue
        seen.add(key)
        out.append({"tokens": tokens, "tags": tags})
    return out


def write_conll(path: Path, sentences: list[dict], docstart: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["-DOCSTART- -X- O O", ""] if docstart else []
    for s in sentences:
        lines += [f"{t} {g}" for t, g in zip(s["tokens"], s["tags"], strict=True)] + [""]
    path.write_text("\n".join(lines))
    return path


# -------------------------------------------------------------------- causal models


def build_tiny_causal_model(out: Path, seed: int = 0) -> Path:
    """A tiny Llama with a byte-level BPE tokenizer trained here (EOS = pad)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    corpus = [r["text"] for r in make_rows(40, seed=99)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        model_max_length=128,
    )
    fast.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|endoftext|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=fast.eos_token_id,
        bos_token_id=fast.eos_token_id,
        pad_token_id=fast.eos_token_id,
    )
    model = LlamaForCausalLM(cfg)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_causal_model() -> Path:
    return build_tiny_causal_model(_SESSION_TMP / "tiny-llama")


def make_qa_rows(n: int, seed: int = 0) -> list[dict]:
    """SQuAD-layout questions over short synthetic business passages."""
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        person, org, place = rng.choice(PEOPLE), rng.choice(ORGS), rng.choice(PLACES)
        filler = " ".join(rng.sample(FILLER, 5))
        context = f"{filler.capitalize()} . {person} joined {org} in {place} . {' '.join(rng.sample(FILLER, 4))} ."
        kind = rng.choice(["who", "where", "which"])
        question, answer = {
            "who": (f"Who joined {org} ?", person),
            "where": (f"Where did {person} join {org} ?", place),
            "which": (f"Which company did {person} join ?", org),
        }[kind]
        if (question, context) in seen:
            continue
        seen.add((question, context))
        out.append(
            {
                "context": context,
                "question": question,
                "answers": {"text": [answer], "answer_start": [context.index(f" {answer} ") + 1]},
            }
        )
    return out


# ------------------------------------------------------------------ real services


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3 API server (moto's server mode) on a free port of 127.0.0.1 for the whole
    session; its credentials are in this process's environment (``DT_S3_KEY`` /
    ``DT_S3_SECRET``, read through ``${env:...}`` by configs)."""
    pytest.importorskip("s3fs", reason="the s3 extra (s3fs) is not installed")
    pytest.importorskip("moto", reason="moto[server] is not installed")
    from tests.services import s3_server

    with s3_server(tmp_path_factory.mktemp("moto")) as server:
        os.environ.update(server.env())
        yield server


@pytest.fixture
def s3_store(s3):
    """A config's ``store`` section for a fresh bucket on the S3 API server."""
    bucket = s3.bucket()
    return {"root": f"s3://{bucket}/store", "storage_options": s3.storage_options()}


@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
    """A real PostgreSQL 15 server (Debian's package) of this test session: initdb into a
    temporary folder, a free port of 127.0.0.1, a password-protected user ``prefect``."""
    from tests.services import postgres_bin, postgres_server

    if postgres_bin() is None:
        pytest.skip("PostgreSQL is not installed (make install installs Debian's postgresql)")
    with postgres_server(tmp_path_factory.mktemp("postgres")) as pg:
        yield pg
