"""Checks `ds-cl train` runs in each process before DeepSpeed, the model or any output is touched:
every input that can be read cheaply is read once, so that a bad one fails in seconds with one line
naming what and where (docs/reliability.md has the table of cases), not after minutes on GPUs.

    check_inputs(cfg, world, resume)   # raises ConfigError

What is checked beyond the run config's own validation (ds_cl/training/config.py): the output folder, the
tokenizer, the model folder (config, safetensors weights), tokenizer/model vocabulary sizes, every
task's data files, method.replay.earlier's and method.osft.protect_inputs_of's (read and mapped to prompts;
tokenisation is left to the trainer) and the DeepSpeed config against the run config and the world size.
"""

from __future__ import annotations

import os
from pathlib import Path

from ds_cl.methods import PROJECTING
from ds_cl.training.config import ConfigError, RunConfig, TaskConfig


def check_output_dir(cfg: RunConfig, resume: bool, start_ok: bool = False) -> None:
    """`start_ok` (--resume-or-start): a --resume that finds no run starts one."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir: {out} exists and is not a folder")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir: {out}: {probe} is not writable")
    latest = out / "checkpoints" / "latest"
    if not resume and latest.is_file():
        raise ConfigError(f"output_dir: {out} already holds a run (checkpoint {latest.read_text().strip()}); "
                          "pass --resume to continue it, or choose a new output_dir (nothing was overwritten)")
    # Every run writes config.yaml before its first step: neither it nor a checkpoint means that --resume
    # points at the wrong folder (a misspelt output_dir), where it used to start over without a word. A
    # requeued job may not have got that far: it passes --resume-or-start.
    if resume and not start_ok and not latest.is_file() and not (out / "config.yaml").is_file():
        raise ConfigError(f"--resume: output_dir {out} holds no run to resume (no checkpoints/latest, no config.yaml): "
                          "check output_dir, or start the run without --resume (--resume-or-start starts one when "
                          "there is nothing to resume)")


# What may change between a run and its --resume: how it is evaluated, checkpointed, logged and where it
# lives. Anything else (seed, data, batch arithmetic, method, model, optimizer, DeepSpeed) changes what the
# run trains, and a resumed run would mix two experiments under one name.
RESUME_SAFE = ("output_dir", "eval.batch_size", "eval.retention_suite", "eval.retention_after", "checkpoint.",
               "output.plots", "output.report_to", "method.osft.pre_step_copy", "model.gradient_checkpointing",
               "train.on_nonfinite", "train.dist_timeout_minutes", "train.deterministic", "deepspeed.steps_per_print",
               "deepspeed.wall_clock_breakdown")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_saved_config(cfg: RunConfig, resume: bool, config_path: str | os.PathLike | None = None) -> list[str]:
    """The run's `config.yaml` in output_dir: never overwrite a file ds-cl did not write (the user's own
    config kept there), and on --resume refuse changes that alter what the run trains. Returns the safe
    changes, one string each, for the caller to report."""
    import yaml

    from ds_cl.training.config import CONFIG_HEADER, to_dict

    saved = Path(cfg.output_dir) / "config.yaml"
    if not saved.is_file():
        return []
    text = saved.read_text(errors="replace")
    try:
        old = yaml.safe_load(text)
    except yaml.YAMLError:
        old = None
    ours = text.startswith(CONFIG_HEADER) or (isinstance(old, dict) and old.get("output_dir") == str(cfg.output_dir)
                                             and isinstance(old.get("deepspeed"), dict))
    if not ours:
        running = config_path is not None and Path(config_path).resolve() == saved.resolve()
        raise ConfigError(f"output_dir: {saved} {'is the config you are running' if running else 'exists'} and was "
                          f"not written by ds-cl; ds-cl writes the run's resolved config there: keep your config "
                          f"outside output_dir or choose another output_dir (nothing was written)")
    if not resume or not isinstance(old, dict):
        return []
    before, now = _flat(old), _flat(to_dict(cfg))
    # A list key ds-cl added since the run started, empty now (method.replay.earlier: []), adds nothing to
    # what the run trains.
    added_empty = {k for k in set(now) - set(before) if now[k] == []}
    changed = sorted(k for k in (set(before) | set(now)) - added_empty if before.get(k) != now.get(k))
    show = lambda k: f"{k} {before.get(k)!r} -> {now.get(k)!r}"  # noqa: E731
    unsafe = [k for k in changed if not any(k == p or (p.endswith(".") and k.startswith(p)) for p in RESUME_SAFE)]
    if unsafe:
        listed = "; ".join(show(k) for k in unsafe[:6]) + (f"; and {len(unsafe) - 6} more" if len(unsafe) > 6 else "")
        raise ConfigError(f"--resume: the config differs from the run's ({saved}) in what it trains: {listed}; "
                          f"undo these, or start a new output_dir (nothing was written)")
    return [show(k) for k in changed]


def _model_vocab(cfg: RunConfig) -> int | None:
    m = cfg.model
    if m.name_or_path is None:
        return (m.config or {}).get("vocab_size")
    from transformers import AutoConfig

    try:
        hf = AutoConfig.from_pretrained(m.name_or_path)
    except Exception as e:  # transformers raises OSError / ValueError with long texts
        raise ConfigError(f"model.name_or_path: {m.name_or_path}: not a loadable model "
                          f"({str(e).splitlines()[0][:200]})") from None
    return getattr(hf, "vocab_size", None) or getattr(getattr(hf, "text_config", None), "vocab_size", None)


def check_model(cfg: RunConfig) -> None:
    p = cfg.model.name_or_path
    if p is None or not os.path.exists(p):
        return  # built from model.config, or a hub name (loaded later)
    folder = Path(p)
    if not folder.is_dir():
        raise ConfigError(f"model.name_or_path: {folder} is a file; give the model folder")
    if not (folder / "config.json").is_file():
        raise ConfigError(f"model.name_or_path: {folder} has no config.json (not an HF model folder)")
    if not any(folder.glob("*.safetensors")):
        pickled = sorted(x.name for x in folder.glob("*.bin")) + sorted(x.name for x in folder.glob("*.pt"))
        hint = (f" ({', '.join(pickled[:2])} are pickles, which ds-cl does not load: convert them with "
                "save_pretrained(..., safe_serialization=True))") if pickled else ""
        raise ConfigError(f"model.name_or_path: {folder} has no *.safetensors weights{hint}")


def check_model_shapes(cfg: RunConfig) -> None:
    """The model's own arithmetic, and the method's settings against the model built on the meta device
    (no memory, no weights): target patterns that match nothing or the wrong parameters fail here, in
    seconds, not after DeepSpeed started and the weights were loaded."""
    import importlib

    from ds_cl.methods import REGISTRY
    from ds_cl.training.modeling import hf_config, meta_model

    key = "model.config" if cfg.model.config is not None else "model.name_or_path"

    def check_heads(get) -> None:
        hidden, heads = get("hidden_size"), get("num_attention_heads")
        kv = get("num_key_value_heads") or heads
        if isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
            if get("head_dim") is None and hidden % heads:
                raise ConfigError(f"{key}: hidden_size {hidden} is not a multiple of num_attention_heads {heads} "
                                  f"({hidden} / {heads} = {hidden / heads:.2f})")
            if isinstance(kv, int) and kv > 0 and heads % kv:
                raise ConfigError(f"{key}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")

    if cfg.model.config is not None:  # before transformers, whose own check says less
        check_heads(cfg.model.config.get)
    try:
        hf = hf_config(cfg.model.config, cfg.model.name_or_path)
    except Exception as e:  # transformers raises several kinds for a bad config
        detail = " ".join(line.strip() for line in str(e).splitlines()[:3] if line.strip())[:300]
        raise ConfigError(f"{key}: not a valid model config ({type(e).__name__}: {detail})") from None
    check_heads(lambda k: getattr(hf, k, None))
    try:
        model = meta_model(hf)
    except Exception as e:
        raise ConfigError(f"{key}: the model cannot be built ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    module, cls = REGISTRY[cfg.method.name].split(":")
    try:
        getattr(importlib.import_module(module), cls).check_model(cfg, model)
    except ValueError as e:
        raise ConfigError(str(e).splitlines()[0]) from None


def tokenizer_size(tok) -> int:
    if getattr(tok, "kind", None) == "sentencepiece":
        return tok.sp.get_piece_size()
    return len(tok.tok)


# Any of these makes a folder a tokenizer that transformers (or sentencepiece) can read.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "vocab.txt",
                   "merges.txt", "spiece.model", "sentencepiece.bpe.model", "tokenizer.tiktoken")


def check_tokenizer(cfg: RunConfig):
    from ds_cl.training.data import load_tokenizer

    path = cfg.model.tokenizer or cfg.model.name_or_path
    key = "model.tokenizer" if cfg.model.tokenizer else "model.name_or_path"
    # A folder of none of them: transformers would try to convert a tokenizer that is not there and say
    # that sentencepiece or tiktoken is missing, which sends the user to install a package.
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        fix = ("give the folder that holds them, or a SentencePiece .model file" if cfg.model.tokenizer
               else "set model.tokenizer to the tokenizer's folder or SentencePiece .model file")
        raise ConfigError(f"{key}: {path} has no tokenizer files (tokenizer.json, tokenizer.model, ...): {fix}")
    try:
        tok = load_tokenizer(path, cfg.model.chat_template)
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None
    except Exception as e:
        raise ConfigError(f"{key}: {path}: cannot load a tokenizer ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    vocab = _model_vocab(cfg)
    n = tokenizer_size(tok)
    if vocab is not None and n > vocab:
        raise ConfigError(f"{key}: the tokenizer {path} has {n} tokens but the model's vocab_size is {vocab}: "
                          "token ids past the embedding would crash training; use the model's own tokenizer")
    return tok


def read_train(task: TaskConfig, key: str) -> tuple[list[dict], str, TaskConfig, list[str], list]:
    """A task's (or a method.replay.earlier source's) training records, read and mapped to prompts, as
    (records, format, the task in ds-cl's terms, labels, examples); ValueError or OSError naming `key`."""
    from ds_cl.training.data import detect_format, normalize_records, read_records, task_labels, to_examples

    rows = read_records(task.train, task.train_split, f"{key}.train")
    if not rows:
        raise ValueError(f"{key}.train: {task.train} holds no records")
    fmt = detect_format(task, rows)
    where = f"{key}.train ({task.train})"  # the record errors name the file too
    plain, norm = normalize_records(task, rows, where, fmt)
    labels = task_labels(plain, norm)
    return rows, fmt, plain, labels, to_examples(plain, norm, labels, where)


def check_data(cfg: RunConfig) -> None:
    from ds_cl.training.data import (check_options, earlier_key, normalize_records, read_records, scorable,
                                     scoring_options, split_indices, to_examples)

    for i, task in enumerate(cfg.tasks):
        key = f"tasks.{i} ({task.name})"
        try:
            rows, fmt, plain, labels, examples = read_train(task, key)
            answers = [e.answer for e in examples]
            answers_of = f"{task.train} (the evaluation records are held out of them)"
            if task.eval is not None:
                ev = read_records(task.eval, task.eval_split, f"{key}.eval")
                if not ev:
                    raise ValueError(f"{key}.eval: {task.eval} holds no records")
                where = f"{key}.eval ({task.eval})"
                ev = scorable(plain, normalize_records(task, ev, where, fmt)[1], labels, where)
                if not ev:
                    raise ValueError(f"{key}.eval: no record of {task.eval} has an answer among the task's labels")
                answers, answers_of = [e.answer for e in to_examples(plain, ev, labels, where)], task.eval
            elif len(rows) < 2:
                raise ValueError(f"{key}.train: {task.train} has {len(rows)} record; holding out evaluation "
                                 "samples needs at least 2 (or set tasks.*.eval)")
            # eval.tuning_size: too few records is an error here (split_indices), before any training
            held, tuning, _ = split_indices(task, len(rows), cfg.seed, cfg.eval.tuning_size, key)
            if cfg.eval.scoring == "options":  # every answer it may be evaluated on is an option
                options = scoring_options(task, rows, f"{key}.train")
                check_options(options, answers, key, answers_of)
                if tuning:  # the tuning records are scored the same way
                    check_options(options, [examples[j].answer for j in tuning], key,
                                  f"{task.train} (its tuning records, eval.tuning_size)")
            held_out = len(held) + len(tuning)
            n_train = len(rows) - held_out
            if task.max_train_samples is not None:
                n_train = min(n_train, task.max_train_samples)
            if n_train < cfg.train.global_batch_size and cfg.method.name != "multitask":  # it pools the tasks
                raise ValueError(f"{key}.train: {n_train} training records ({len(rows)} - {held_out} held out"
                                 f"{'' if task.max_train_samples is None else f', max_train_samples {task.max_train_samples}'}"
                                 f") are fewer than train.global_batch_size {cfg.train.global_batch_size}: not "
                                 f"one full step")
        except ConfigError:
            raise
        except (ValueError, OSError) as e:
            raise ConfigError(str(e).splitlines()[0]) from None
        if task.metric != "exact_match":
            from ds_cl.training.data import resolve_metric

            try:
                fn = resolve_metric(task.metric)
            except (ImportError, AttributeError) as e:
                raise ConfigError(f"{key}.metric: cannot import {task.metric!r} ({e})") from None
            if not callable(fn):
                raise ConfigError(f"{key}.metric: {task.metric!r} is a {type(fn).__name__}, not a function "
                                  f"(prediction, reference) -> float")
    o = cfg.method.osft
    for within, sources in (("method.replay.earlier", cfg.method.replay.earlier),
                            ("method.osft.protect_inputs_of", o.protect_inputs_of or [])):
        for j, source in enumerate(sources):  # all their records train (or are protected): read them all
            try:
                read_train(source, earlier_key(j, source, within))
            except (ValueError, OSError) as e:
                raise ConfigError(str(e).splitlines()[0]) from None
    if cfg.method.name in PROJECTING and o.first_task_importance_data:
        rows = read_records(o.first_task_importance_data, "train", "method.osft.first_task_importance_data")
        if not rows or o.first_task_importance_field not in rows[0]:
            raise ConfigError(f"method.osft.first_task_importance_field: {o.first_task_importance_field!r} is not a "
                              f"field of {o.first_task_importance_data} (fields: "
                              f"{', '.join(map(str, rows[0])) if rows else 'no records'})")


def check_deepspeed(cfg: RunConfig, world: int) -> None:
    """Batch arithmetic, precision and ZeRO stage against the method (ds_cl/training/ds_config.py)."""
    from ds_cl.training.ds_config import check_ds_config

    check_ds_config(cfg, world)


def check_inputs(cfg: RunConfig, world: int | None = None, resume: bool = False,
                 config_path: str | os.PathLike | None = None, start_ok: bool = False) -> list[str]:
    """Everything above, cheapest first. Raises ConfigError (one line). `world`: default the world size
    this process will join (ds_cl.training.environment.world_size: torch env, SLURM, else 1). Returns
    the config changes a --resume accepted (check_saved_config), for the caller to report."""
    if world is None:
        from ds_cl.training.environment import world_size

        try:
            world = world_size()
        except ValueError as e:
            raise ConfigError(str(e)) from None
    check_output_dir(cfg, resume, start_ok)
    accepted = check_saved_config(cfg, resume, config_path)
    check_deepspeed(cfg, world)
    check_model(cfg)
    check_model_shapes(cfg)
    check_tokenizer(cfg)
    check_data(cfg)
    return accepted
