"""Task data for `ds-cl train`: reading records, prompt templates, tokenisation with the loss on the
answer tokens only, truncation (counted, warned once per task), deterministic shuffling and
data-parallel sharding.

A training sample is `[bos] + prompt + answer + [eos]` with labels -100 on `[bos] + prompt`, so the
model learns to produce the answer and the end of it. Evaluation feeds `[bos] + prompt` and compares
the greedy continuation with the reference answer.
"""

from __future__ import annotations

import csv
import importlib
import json
import logging
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from ds_cl.training.config import TaskConfig
from ds_cl.training.records import check_objects, decode_utf8, parse_jsonl

log = logging.getLogger("ds_cl.training.data")

IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------
# Tokenizers: SentencePiece files (LLaMA-2 style) read by sentencepiece itself, everything else by
# transformers: transformers' readers of a bare tokenizer.model disagree with
# sentencepiece (missing "▁", empty ids), so we do not route SentencePiece through them.


class SentencePieceTokenizer:
    kind = "sentencepiece"

    def __init__(self, model_file: str):
        import sentencepiece as spm

        self.path = model_file
        self.sp = spm.SentencePieceProcessor(model_file=model_file)
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"{model_file}: SentencePiece model needs bos and eos pieces")
        # LLaMA-2's model has no pad piece (pad_id -1): pad with eos; padded positions are masked anyway.
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id

    def encode_prompt(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_answer(self, text: str) -> list[int]:
        # sentencepiece prefixes "▁" (a space) to each encoded piece of text, so "Answer:" + "▁pos"
        # is what the tokenizer gives for "Answer: pos" in one go.
        return self.sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([i for i in ids if i not in (self.eos_id, self.pad_id)])

    def save(self, folder: str) -> None:
        import shutil

        shutil.copyfile(self.path, os.path.join(folder, "tokenizer.model"))
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
                       "bos_token": self.sp.id_to_piece(self.bos_id), "eos_token": self.sp.id_to_piece(self.eos_id),
                       "unk_token": self.sp.id_to_piece(self.sp.unk_id()), "legacy": True}, f, indent=1)


class HFTokenizer:
    kind = "hf"

    def __init__(self, path: str, chat_template: bool):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path)
        self.chat = chat_template
        if chat_template and not getattr(self.tok, "chat_template", None):
            raise ValueError(f"{path}: model.chat_template is true but the tokenizer has no chat template")
        self.bos_id = self.tok.bos_token_id
        self.eos_id = self.tok.eos_token_id
        if self.eos_id is None:
            raise ValueError(f"{path}: tokenizer has no eos token")
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos_id

    def encode_prompt(self, text: str) -> list[int]:
        if self.chat:
            ids = self.tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                               tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            # The template carries its own bos; ours is added in encode_example, so drop a leading one.
            return list(ids[1:] if self.bos_id is not None and ids and ids[0] == self.bos_id else ids)
        return self.tok.encode(text, add_special_tokens=False)

    def render(self, messages: list, generation_prompt: bool) -> list[int]:
        ids = self.tok.apply_chat_template([{"role": m.get("role", "user"), "content": str(m["content"])}
                                            for m in messages], add_generation_prompt=generation_prompt,
                                           tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def encode_chat(self, messages: list, loss_on: str) -> tuple[list[int], list[int]]:
        """(ids, labels) of a conversation rendered by the chat template, as HF's chat fine-tuning does:
        labels are the ids on the last assistant turn (or every one) and IGNORE_INDEX elsewhere. Each turn's
        span is found by rendering the conversation up to it, so the template must render prefixes as
        prefixes (true of ChatML, LLaMA-2's and most others; checked)."""
        ids = self.render(messages, generation_prompt=False)
        labels = [IGNORE_INDEX] * len(ids)
        turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
        for i in (turns if loss_on == "assistant" else turns[-1:]):
            start = len(self.render(messages[:i], generation_prompt=True))
            upto = self.render(messages[: i + 1], generation_prompt=False)
            if ids[: len(upto)] != upto or upto[:start] != self.render(messages[:i], generation_prompt=True):
                raise ValueError("the tokenizer's chat template does not render a conversation's beginning as "
                                 "a prefix of the whole; use tasks.*.loss_on: last with shorter records, or "
                                 "model.chat_template: false")
            labels[start: len(upto)] = ids[start: len(upto)]
        return ids, labels

    def encode_answer(self, text: str) -> list[int]:
        # BPE tokenizers mark word starts with the space: " positive" is what follows "Answer:".
        return self.tok.encode(text if self.chat else " " + text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def save(self, folder: str) -> None:
        self.tok.save_pretrained(folder)


def load_tokenizer(path: str, chat_template: bool = False):
    """A `.model` file or a folder holding only tokenizer.model: SentencePiece; else transformers."""
    p = Path(path)
    if p.suffix == ".model" and p.is_file():
        spm_file = str(p)
    elif p.is_dir() and (p / "tokenizer.model").is_file() and not (p / "tokenizer.json").is_file():
        spm_file = str(p / "tokenizer.model")
    else:
        return HFTokenizer(path, chat_template)
    if chat_template:
        raise ValueError(f"{path}: model.chat_template needs an HF tokenizer with a chat template")
    return SentencePieceTokenizer(spm_file)


# ---------------------------------------------------------------------------------------------
# Reading records.


def read_records(source: str, split: str, key: str = "data") -> list[dict]:
    """Rows of a .json/.jsonl/.csv/.parquet file, a `save_to_disk` folder, or a `datasets` name."""
    p = Path(source)
    if p.is_file():
        if p.suffix in (".jsonl", ".json", ".csv"):
            text = decode_utf8(p.read_bytes(), f"{key}: {p}")
            if not text.strip():
                raise ValueError(f"{key}: {p} is empty")
        if p.suffix == ".jsonl":
            rows = [row for _, row in parse_jsonl(text, f"{key}: {p}")]
        elif p.suffix == ".json":
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{key}: {p}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            if isinstance(rows, dict) and split in rows:  # {"train": [...], "test": [...]}
                rows = rows[split]
            if not isinstance(rows, list):
                raise ValueError(f"{key}: {p} must hold a list of records (or a mapping of split -> list)")
            check_objects(rows, f"{key}: {p}")
        elif p.suffix == ".csv":
            import io

            rows = list(csv.DictReader(io.StringIO(text, newline="")))
        elif p.suffix == ".parquet":
            import pyarrow.parquet as pq

            rows = pq.read_table(p).to_pylist()
        else:
            raise ValueError(f"{key}: {p}: unsupported file type {p.suffix!r} (use .json .jsonl .csv .parquet)")
        return rows
    import datasets

    if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists()
                       or (p / "state.json").exists()):
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{key}: {p} has splits {list(ds)}, not {split!r}")
            ds = ds[split]
    else:
        ds = datasets.load_dataset(source, split=split)
    return [dict(r) for r in ds]


# ---------------------------------------------------------------------------------------------
# Prompts.


@dataclass
class Example:
    prompt: str
    answer: str
    # A chat record's turns (the last is the answer): with a chat template they are rendered as turns,
    # system prompt included, and the loss covers the last assistant turn or (loss_on "assistant") all.
    messages: Optional[list] = None
    loss_on: str = "last"


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}


def detect_format(task: TaskConfig, rows: list[dict]) -> str:
    """`task.format`, or for auto the format the first record's keys show (input_output when unsure:
    its own error then names the missing fields)."""
    if task.format != "auto":
        return task.format
    if task.messages_field:
        return "messages"
    keys = set(rows[0]) if rows and isinstance(rows[0], dict) else set()
    if {"instruction", "output"} <= keys and "instruction" not in (task.input_field, task.output_field):
        return "alpaca"  # it has input/output fields too, but the instruction is part of the prompt
    if {task.input_field, task.output_field} <= keys:
        return "input_output"
    for fmt, need in (("trace", {"prompt", "answer"}), ("alpaca", {"instruction", "output"}),
                      ("messages", {"messages"}), ("sharegpt", {"conversations"})):
        if need <= keys:
            return fmt
    return "input_output"


def normalize_records(task: TaskConfig, rows: list[dict], key: str,
                      fmt: str | None = None) -> tuple[TaskConfig, list[dict]]:
    """The task and its records in ds-cl's own terms (input/output fields, or a `messages` list): TRACE's
    prompt/answer and Alpaca's instruction/input/output become input/output with the prompt used as it
    is (they carry their own instructions: no template); ShareGPT's conversations become messages."""
    import dataclasses

    fmt = fmt or detect_format(task, rows)
    if fmt == "input_output":
        return task, rows

    def field(r, n, name, optional=False):
        if not isinstance(r, dict) or (name not in r and not optional):
            raise ValueError(f"{key}: record {n} has no field {name!r} ({fmt} format: "
                             f"fields {', '.join(map(str, r)) if isinstance(r, dict) else type(r).__name__})")
        v = r.get(name)
        if v is None and not optional:
            raise ValueError(f"{key}: record {n}: field {name!r} has no value (null)")
        return "" if v is None else str(v)

    plain = dataclasses.replace(task, input_field="input", output_field="output", messages_field=None, template=None)
    if fmt == "trace":
        return plain, [{"input": field(r, n, "prompt"), "output": field(r, n, "answer")} for n, r in enumerate(rows)]
    if fmt == "alpaca":
        out = []
        for n, r in enumerate(rows):
            extra = field(r, n, "input", optional=True).strip()
            text = field(r, n, "instruction").strip() + (f"\n\n{extra}" if extra else "")
            out.append({"input": text, "output": field(r, n, "output")})
        return plain, out
    chat = dataclasses.replace(task, messages_field="messages")
    if fmt == "messages":
        name = task.messages_field or "messages"
        return chat, [{"messages": r.get(name) if isinstance(r, dict) else None} for r in rows]
    out = []  # sharegpt
    for n, r in enumerate(rows):
        turns = r.get("conversations") if isinstance(r, dict) else None
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            raise ValueError(f"{key}: record {n}: 'conversations' must be a list of {{'from', 'value'}} turns")
        msgs = []
        for t in turns:
            role = SHAREGPT_ROLES.get(str(t.get("from", "")).lower())
            if role is None:
                raise ValueError(f"{key}: record {n}: unknown speaker {t.get('from')!r} (expected one of "
                                 f"{', '.join(sorted(SHAREGPT_ROLES))})")
            msgs.append({"role": role, "content": str(t.get("value", ""))})
        out.append({"messages": msgs})
    return chat, out


def task_labels(task: TaskConfig, train_rows: list[dict]) -> list[str]:
    if task.labels is not None:
        return list(task.labels)
    if task.messages_field:
        return []
    return sorted({str(r[task.output_field]).strip() for r in train_rows if task.output_field in r})


def to_examples(task: TaskConfig, rows: list[dict], labels: list[str], key: str) -> list[Example]:
    """Records to prompt/answer examples; errors name `key` and the record's index from 0 (in a JSONL file,
    record n is on line n + 1)."""
    out = []
    for n, r in enumerate(rows):
        if task.messages_field:
            msgs = r.get(task.messages_field)
            if (not isinstance(msgs, list) or len(msgs) < 2 or not all(isinstance(m, dict) and "content" in m
                                                                      for m in msgs)
                    or msgs[-1].get("role") != "assistant"):
                raise ValueError(f"{key}: record {n}: {task.messages_field!r} must be a list of chat messages "
                                 "ending with an assistant turn")
            # Earlier turns are flattened into the prompt; the last assistant turn is the answer.
            prompt = "\n".join(m["content"] for m in msgs[:-1])
            answer = str(msgs[-1]["content"])
        else:
            for f in (task.input_field, task.output_field):
                if f not in r:
                    raise ValueError(f"{key}: record {n} has no field {f!r} (fields: {', '.join(map(str, r))}); "
                                     f"set tasks.*.input_field / output_field")
            for f in (task.input_field, task.output_field):
                v = r[f]
                if v is None or (isinstance(v, float) and v != v):  # JSON null, an empty CSV/Parquet cell
                    raise ValueError(f"{key}: record {n}: field {f!r} has no value (null or empty cell); "
                                     f"it would train on the text {str(v)!r}")
            text, answer = str(r[task.input_field]), str(r[task.output_field]).strip()
            prompt = text if task.template is None else task.template.format(
                instruction=task.instruction, options=", ".join(labels), input=text).lstrip()
        if not answer.strip():
            raise ValueError(f"{key}: record {n} has an empty output ({task.output_field!r})")
        if task.labels is not None and not task.messages_field and answer not in labels:
            raise ValueError(f"{key}: record {n}: answer {answer!r} is not one of the task's labels "
                             f"({', '.join(map(repr, labels[:8]))}{', ...' if len(labels) > 8 else ''}); the "
                             f"prompt's options would not offer it")
        out.append(Example(prompt, answer, msgs if task.messages_field else None, task.loss_on))
    return out


# ---------------------------------------------------------------------------------------------
# Tokenisation.


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]


def encode_example(tok, ex: Example, max_len: int) -> tuple[Encoded, bool]:
    """(sample, truncated). Over-long prompts lose their *start* (the answer and the template's tail
    such as "Answer:" stay); an answer longer than the budget is cut at its end. A chat record with a
    chat template is rendered whole (`encode_chat`); too long, it loses its start."""
    if ex.messages is not None and getattr(tok, "chat", False):
        ids, labels = tok.encode_chat(ex.messages, ex.loss_on)
        cut = max(0, len(ids) - max_len)
        return Encoded(ids[cut:], labels[cut:]), cut > 0
    bos = [tok.bos_id] if tok.bos_id is not None else []
    prompt = tok.encode_prompt(ex.prompt)
    answer = tok.encode_answer(ex.answer) + [tok.eos_id]
    truncated = False
    room = max_len - len(bos) - len(answer)
    if room < 1:  # keep one prompt token so there is something to condition on
        answer = answer[: max_len - len(bos) - 1]
        room, truncated = 1, True
    if len(prompt) > room:
        prompt, truncated = prompt[len(prompt) - room:], True
    ids = bos + prompt + answer
    labels = [IGNORE_INDEX] * (len(bos) + len(prompt)) + answer
    return Encoded(ids, labels), truncated


def encode_all(tok, examples: list[Example], max_len: int, what: str) -> list[Encoded]:
    out, n_trunc = [], 0
    for ex in examples:
        enc, t = encode_example(tok, ex, max_len)
        out.append(enc)
        n_trunc += t
    if n_trunc:
        log.warning("%s: %d of %d samples truncated to train.max_seq_len=%d tokens", what, n_trunc,
                    len(examples), max_len)
    return out


def encode_prompt_for_generation(tok, prompt: str, max_len: int, messages: list | None = None) -> list[int]:
    """The ids a model continues to answer: `prompt` after bos, or with a chat template and `messages`
    (a chat record) every turn before the last, rendered, with the assistant's generation prompt."""
    if messages is not None and getattr(tok, "chat", False):
        ids = tok.render(messages[:-1], generation_prompt=True)
        return ids[max(0, len(ids) - max_len):]
    bos = [tok.bos_id] if tok.bos_id is not None else []
    ids = tok.encode_prompt(prompt)
    return bos + ids[max(0, len(ids) - (max_len - len(bos))):]


# ---------------------------------------------------------------------------------------------
# A task, loaded.


@dataclass
class TaskData:
    name: str
    train: list[Encoded]
    eval_prompts: list[list[int]]
    eval_answers: list[str]
    metric: Callable[[str, str], float]
    # eval.scoring: options only: the options, and per evaluation prompt each option's target ids
    # (`option_targets`), in the options' order.
    options: Optional[list[str]] = None
    eval_option_ids: Optional[list[list[list[int]]]] = None
    # eval.tuning_size > 0: the tuning records held out of the training records, as a TaskData of their own
    # (no training samples; eval_* are the tuning items), scored as the evaluation records are.
    tuning: Optional["TaskData"] = None


def normalize_answer(s: str) -> str:
    return re.sub(r"\s+", " ", s.strip().strip(".").strip()).lower()


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if the first line of the generation equals the reference (case, spaces and a final dot aside)."""
    first = prediction.strip().split("\n")[0]
    return float(normalize_answer(first) == normalize_answer(reference))


def resolve_metric(spec: str) -> Callable[[str, str], float]:
    if spec == "exact_match":
        return exact_match
    mod, _, fn = spec.partition(":")
    return getattr(importlib.import_module(mod), fn)


def scorable(task: TaskConfig, rows: list[dict], labels: list[str] | None, key: str) -> list[dict]:
    """The evaluation records whose answer is one of the task's labels. Benchmarks mark items without a
    gold answer with a label of their own (MNLI's test split: '-'); no prompt offers it, so such an item
    cannot be scored and is left out, with a warning. (In training records the same is an error.)"""
    if task.labels is None or task.messages_field:
        return rows
    allowed = set(labels)
    keep = [r for r in rows if str(r.get(task.output_field, "")).strip() in allowed]
    if len(keep) < len(rows):
        odd = sorted({str(r.get(task.output_field, "")).strip() for r in rows} - allowed)
        log.warning("%s: %d of %d records have an answer outside the task's labels (%s) and are left out of "
                    "the evaluation", key, len(rows) - len(keep), len(rows), ", ".join(map(repr, odd[:5])))
    return keep


def holdout_size(eval_size: int, n_records: int) -> int:
    """Records a task without `eval` holds out of its training records for evaluation: eval_size, at most
    half of them (the rest train)."""
    return min(eval_size, n_records // 2)


def split_indices(task: TaskConfig, n_records: int, seed: int, tuning_size: int = 0,
                  key: str = "") -> tuple[list[int], list[int], list[int]]:
    """(evaluation, tuning, training) indices of a task's `n_records` training records. One shuffle by seed and
    task name: a task without `eval` holds out its first holdout_size records for evaluation, the next
    `tuning_size` (eval.tuning_size) are the tuning split, the rest train: in the shuffle's order when some are
    held out for evaluation, else in the file's (as without a tuning split). The tuning records leave the
    pool before max_train_samples caps it. ValueError (naming `key`) when a tuning split leaves no training
    record."""
    order = list(range(n_records))
    random.Random(f"{seed}-holdout-{task.name}").shuffle(order)
    n = 0 if task.eval is not None else holdout_size(task.eval_size, n_records)
    held, tuning = order[:n], order[n:n + tuning_size]
    if tuning_size and n_records - n - tuning_size < 1:
        raise ValueError(f"{key}.train: {n_records} records leave no training record beside eval.tuning_size "
                         f"{tuning_size}{f' and {n} held out for evaluation' if n else ''}: a tuning split needs "
                         f"at least {n + tuning_size + 1} records; lower eval.tuning_size")
    if task.eval is None:
        train = order[n + tuning_size:]
    else:
        skip = set(tuning)
        train = [i for i in range(n_records) if i not in skip]
    return held, tuning, train


# eval.scoring: options, options inferred from the records (no tasks.*.options or labels): more distinct
# answers than this is not a task with fixed options (a free-form task would score every answer it has).
MAX_INFERRED_OPTIONS = 100


def scoring_options(task: TaskConfig, rows: list[dict], key: str) -> list[str]:
    """The options eval.scoring: options chooses among: `task.options`; else `task.labels` (the prompt's
    options, a benchmark folder's labels.json); else the sorted distinct answers of `rows`, all the records of
    the task's `train` source (held-out ones included), at most MAX_INFERRED_OPTIONS of them."""
    if task.options is not None:
        return list(task.options)
    plain, norm = normalize_records(task, rows, key)
    labels = task_labels(plain, norm)
    if plain.labels is not None:
        return labels
    answers = sorted({e.answer for e in to_examples(plain, norm, labels, key)})
    if len(answers) > MAX_INFERRED_OPTIONS:
        raise ValueError(f"{key}: eval.scoring: options: its records have {len(answers)} distinct answers (more "
                         f"than {MAX_INFERRED_OPTIONS}): not a task with fixed options; list them in "
                         f"tasks.*.options if it is one, or use eval.scoring: generate")
    return answers


def check_options(options: list[str], answers: list[str], key: str, what: str) -> None:
    """eval.scoring: options needs every evaluation answer (of `what`) among the options, and a choice."""
    if len(options) < 2:
        raise ValueError(f"{key}: eval.scoring: options needs at least 2 options to choose from, the task has "
                         f"{len(options)} ({', '.join(map(repr, options))}); set tasks.*.options, or use "
                         f"eval.scoring: generate")
    allowed = set(options)
    missing = [(n, a) for n, a in enumerate(answers) if a not in allowed]
    if missing:
        n, a = missing[0]
        shown = ", ".join(map(repr, options[:8])) + (", ..." if len(options) > 8 else "")
        raise ValueError(f"{key}: eval.scoring: options: {len(missing)} of {len(answers)} answers of {what} are "
                         f"not among the task's {len(options)} options ({shown}), e.g. record {n}: {a!r}; list "
                         f"them in tasks.*.options, or use eval.scoring: generate")


def option_targets(tok, ex: Example, options: list[str]) -> list[list[int]]:
    """Each option's token ids as the training target of `ex` with that option as its answer (the labels of
    `encode_example`): the answer's tokens and eos; for a chat record under a chat template, the assistant
    turn as the template renders it after the generation prompt, its end-of-turn included."""
    if ex.messages is not None and getattr(tok, "chat", False):
        head = tok.render(ex.messages[:-1], generation_prompt=True)
        out = []
        for o in options:
            full = tok.render(list(ex.messages[:-1]) + [{"role": "assistant", "content": o}], generation_prompt=False)
            if full[: len(head)] != head:
                raise ValueError("the tokenizer's chat template does not render a conversation's beginning as a "
                                 "prefix of the whole; eval.scoring: options needs it (or model.chat_template: false)")
            out.append(full[len(head):])
        return out
    return [tok.encode_answer(o) + [tok.eos_id] for o in options]


def capped_train_rows(task: TaskConfig, rows: list[dict], key: str) -> list[dict]:
    """The training records kept: the first `max_train_samples`; none is an error."""
    if task.max_train_samples is not None:
        rows = rows[: task.max_train_samples]
    if not rows:
        raise ValueError(f"{key}.train: no training records in {task.train}")
    return rows


def train_records(task: TaskConfig, rows: list[dict], key: str,
                  fmt: str | None = None) -> tuple[TaskConfig, list[dict], list[str]]:
    """The task, its training records in ds-cl's own terms (`normalize_records`) and its labels."""
    task, rows = normalize_records(task, rows, f"{key}.train", fmt)
    return task, rows, task_labels(task, rows)


def encode_train(tok, task: TaskConfig, rows: list[dict], labels: list[str], key: str, max_len: int) -> list[Encoded]:
    """Training samples of normalised records (`train_records`), truncated to max_len (counted, warned)."""
    return encode_all(tok, to_examples(task, rows, labels, f"{key}.train"), max_len, f"{key} train")


# The lists of earlier sources a key names (earlier_key, load_earlier's `within`).
EARLIER = "method.replay.earlier"
PROTECT_INPUTS = "method.osft.protect_inputs_of"


def earlier_key(index: int, source: TaskConfig, within: str = EARLIER) -> str:
    """How errors name an entry of method.replay.earlier (or of another list of earlier sources, `within`:
    method.osft.protect_inputs_of), as `tasks.N (name)` names a task."""
    return f"{within}.{index} ({source.name})"


def load_earlier(source: TaskConfig, index: int, tok, max_len: int, rows: list[dict] | None = None,
                 within: str = EARLIER) -> list[Encoded]:
    """The training samples of method.replay.earlier's entry `index` (a task the starting model was trained on
    before this run; `within`: the list it is in, method.osft.protect_inputs_of's entries are read the same way):
    all its records (the first max_train_samples), none held out, encoded as load_task encodes a task's
    training records. `rows`: the source's records when the caller has read them already."""
    key = earlier_key(index, source, within)
    if rows is None:
        rows = read_records(source.train, source.train_split, f"{key}.train")
    rows = capped_train_rows(source, rows, key)
    source, rows, labels = train_records(source, rows, key)
    return encode_train(tok, source, rows, labels, key, max_len)


def scored_items(tok, task: TaskConfig, rows: list[dict], labels: list[str], key: str, part: str, max_len: int,
                 metric: Callable[[str, str], float], options: list[str] | None, what: str) -> TaskData:
    """A TaskData of normalised records to score (no training samples): their prompts and answers and, with
    `options` (eval.scoring: options), each prompt's option target ids. Errors name `key`.`part` (the task and
    "eval" or "tuning"); the options check names `what`."""
    evals = to_examples(task, rows, labels, f"{key}.{part}")
    prompts = [encode_prompt_for_generation(tok, e.prompt, max_len, e.messages) for e in evals]
    data = TaskData(task.name, [], prompts, [e.answer for e in evals], metric)
    if options is not None:
        check_options(options, data.eval_answers, key, what)
        shared = None  # without a rendered chat record, every prompt's options have the same targets
        data.options, data.eval_option_ids = options, []
        for e in evals:
            if e.messages is not None and getattr(tok, "chat", False):
                data.eval_option_ids.append(option_targets(tok, e, options))
            else:
                shared = shared or option_targets(tok, e, options)
                data.eval_option_ids.append(shared)
    return data


def load_task(task: TaskConfig, index: int, tok, max_len: int, seed: int, scoring: str = "generate",
              rows: list[dict] | None = None, tuning_size: int = 0) -> TaskData:
    """scoring "options" (eval.scoring) also fills the options and their target ids per evaluation prompt.
    `rows`: the task's training file's records when the caller has read them already. `tuning_size`
    (eval.tuning_size): that many training records are held out (split_indices) as `TaskData.tuning`."""
    key = f"tasks.{index} ({task.name})"
    if rows is None:
        rows = read_records(task.train, task.train_split, f"{key}.train")
    given, all_rows = task, rows
    # A deterministic slice of the training records held out for evaluation (without `eval`) and for tuning.
    held, tuning_idx, train_idx = split_indices(task, len(rows), seed, tuning_size, key)
    if task.eval is not None:
        eval_rows = read_records(task.eval, task.eval_split, f"{key}.eval")
    else:
        n = len(held)
        if n < task.eval_size:
            log.warning("%s: eval_size %d is more than half of its %d records: %d held out for evaluation (the cap: "
                        "half the records), %d left to train", key, task.eval_size, len(rows), n, len(train_idx))
        eval_rows = [rows[i] for i in held]
    tuning_rows = [rows[i] for i in tuning_idx]
    rows = capped_train_rows(task, [rows[i] for i in train_idx], key)
    fmt = detect_format(task, rows)  # the training records decide; the evaluation records follow
    _, eval_rows = normalize_records(task, eval_rows, f"{key}.eval", fmt)
    _, tuning_rows = normalize_records(task, tuning_rows, f"{key}.tuning", fmt)
    task, rows, labels = train_records(task, rows, key, fmt)
    eval_rows = scorable(task, eval_rows, labels, f"{key}.eval")
    if task.max_eval_samples is not None:
        eval_rows = eval_rows[: task.max_eval_samples]
    if not eval_rows:
        raise ValueError(f"{key}.eval: no evaluation records")
    train = encode_train(tok, task, rows, labels, key, max_len)
    options = scoring_options(given, all_rows, f"{key}.train") if scoring == "options" else None
    metric = resolve_metric(task.metric)
    data = scored_items(tok, task, eval_rows, labels, key, "eval", max_len, metric, options, "its evaluation records")
    data.train = train
    if tuning_size:
        tuning_rows = scorable(task, tuning_rows, labels, f"{key}.tuning")
        if not tuning_rows:
            raise ValueError(f"{key}.tuning: no tuning record has an answer among the task's labels")
        data.tuning = scored_items(tok, task, tuning_rows, labels, key, "tuning", max_len, metric, options,
                                   "its tuning records (eval.tuning_size)")
    return data


# ---------------------------------------------------------------------------------------------
# Order and sharding.


def epoch_order(n: int, seed: int, task_index: int, epoch: int) -> list[int]:
    """The global sample order of one epoch: the same on every rank, every run, every resume."""
    order = list(range(n))
    random.Random(f"{seed}-{task_index}-{epoch}").shuffle(order)
    return order


def steps_per_epoch(n: int, global_batch: int) -> int:
    # The tail that does not fill a global batch is dropped so that every rank runs the same steps.
    return n // global_batch


def rank_micro_batches(order: list[int], step: int, rank: int, world: int, micro: int, gas: int) -> list[list[int]]:
    """Sample indices of optimizer step `step` for `rank`: gas micro-batches of `micro` samples.

    A global batch is a contiguous slice of the epoch order; rank r takes its samples r, r+world, ...
    so the union over ranks is the global batch whatever the world size.
    """
    g = micro * world * gas
    batch = order[step * g:(step + 1) * g]
    mine = batch[rank::world]
    return [mine[i * micro:(i + 1) * micro] for i in range(gas)]


def collate(samples: list[Encoded], pad_id: int):
    import torch

    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        ids[i, :n] = torch.tensor(s.input_ids)
        labels[i, :n] = torch.tensor(s.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_prompts(prompts: list[list[int]], pad_id: int):
    """Left-padded prompts for batched generation."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def replay_buffer(source: list[Encoded], fraction: float, seed: int, source_index: int) -> list[Encoded]:
    """round(fraction x len(source)) of a source's samples, drawn once without replacement: the same buffer
    for every later task (method.replay.fraction_of: earlier). `source_index` counts method.replay.earlier's
    sources first, then the run's tasks."""
    rng = random.Random(f"{seed}-buffer-{source_index}")
    return rng.sample(source, min(len(source), round(fraction * len(source))))


def replay_samples(previous: list[list[Encoded]], n: int, seed: int, task_index: int) -> list[Encoded]:
    """n samples drawn evenly (without replacement where possible) from earlier tasks' training data (and
    method.replay.earlier's sources, first in `previous`)."""
    pool = [s for task in previous for s in task]
    if not pool or n <= 0:
        return []
    rng = random.Random(f"{seed}-replay-{task_index}")
    if n <= len(pool):
        return rng.sample(pool, n)
    return [pool[rng.randrange(len(pool))] for _ in range(n)]
