"""The lm-evaluation-harness bridge: a finished run's adapted causal LM scored on lm-eval's tasks.

    python -m vbshare.evaluate run_dir=RUN harness.tasks=[gsm8k] [harness.num_fewshot=5] [harness.limit=200]
        [harness.batch_size=8] [harness.merge=true] [harness.include_path=DIR] [harness.chat_template=true]
        [harness.add_bos_token=true|false] [harness.seed=0] [out=FOLDER]

    evaluate_with_harness(run_dir, HarnessSettings(tasks=("gsm8k",)), overrides=(), samples_dir=None) -> dict
                                                          (vbshare.evaluate: the run rebuilt, then score_model)
    score_model(model, tokenizer, settings, tasks) -> dict                   (any causal LM, adapted or not)

The run is rebuilt as `vbshare.evaluate` rebuilds it (configs/ plus the overrides it recorded; what it trained
loaded onto a fresh base, whose weights are checked) and handed, in memory, to lm-eval's Hugging Face model
(`HFLM(pretrained=<the adapted model>)`), under the run's `trainer.precision` autocast as vbshare.evaluate
scores it. Every method therefore works, not only those PEFT can load. The run's own data is loaded as its
data config says, but only one example per split is tokenised (`trainer.max_examples=1`): the model is what
lm-eval scores.
`harness.merge=true` first folds the adapter into the base weights (faster decoding; the same scores in fp32,
within rounding in bf16; refused on a 4- or 8-bit base). `harness.include_path` adds a folder of your own lm-eval
task YAMLs (e.g. a task on a local file). lm-eval's own tasks download their data from the Hub on first use;
offline, a missing dataset is one line.

lm-eval is an optional extra (`pip install .[harness]`); nothing else in vbshare imports it. One process:
lm-eval does its own batching, and a model passed in memory is not sharded across processes.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from .core import merge
from .errors import VBShareError
from .files import atomic_write

log = logging.getLogger("vbshare.harness")

PREFIX = "harness."
SAMPLES = "samples_{task}.jsonl"  # per-document requests, responses and metrics of one task, written with out=FOLDER


@dataclass(frozen=True)
class HarnessSettings:
    """What to ask lm-eval for. tasks: lm-eval task, group or tag names (glob patterns allowed);
    num_fewshot: in-context examples (None: each task's own default); limit: documents per task (an int) or a
    fraction of each (a float in (0, 1]), None for all; batch_size: documents per forward pass; merge: fold the
    adapter into the base weights first; include_path: a folder of extra task YAMLs; chat_template: render
    prompts with the tokenizer's chat template; add_bos_token: None keeps the tokenizer's default; seed: lm-eval's
    Python, NumPy, torch and few-shot sampling seeds (None: lm-eval's own defaults, as a plain `lm_eval` run,
    so few-shot prompts match published numbers)."""

    tasks: tuple[str, ...]
    num_fewshot: int | None = None
    limit: int | float | None = None
    batch_size: int = 8
    merge: bool = False
    include_path: str | None = None
    chat_template: bool = False
    add_bos_token: bool | None = None
    seed: int | None = None


def read_harness_settings(values: dict[str, Any]) -> HarnessSettings:
    """HarnessSettings from the command line's `harness.KEY=VALUE` pairs ({KEY: value}); one line per bad value."""
    known = {"tasks", "num_fewshot", "limit", "batch_size", "merge", "include_path", "chat_template", "add_bos_token",
             "seed"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise VBShareError(f"harness.{unknown[0]} is not a harness setting; use one of "
                           f"{', '.join('harness.' + k for k in sorted(known))}")
    tasks = values.get("tasks")
    if isinstance(tasks, str):
        tasks = [tasks]
    if not tasks or not isinstance(tasks, (list, tuple)) or not all(isinstance(t, str) and t for t in tasks):
        raise VBShareError(f"harness.tasks must be a non-empty list of lm-eval task names, e.g. harness.tasks=[gsm8k], "
                           f"got {tasks!r}")

    def whole(key: str, minimum: int, default: Any) -> Any:
        value = values.get(key, default)
        if value is None and default is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise VBShareError(f"harness.{key} must be an integer >= {minimum}, got {value!r}")
        return value

    def flag(key: str, default: bool | None) -> bool | None:
        value = values.get(key, default)
        if value is not None and not isinstance(value, bool):
            raise VBShareError(f"harness.{key} must be true or false, got {value!r}")
        return value

    limit = values.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0
                              or (isinstance(limit, float) and (limit >= 1 or not math.isfinite(limit)))):
        raise VBShareError(f"harness.limit must be a number of documents (an integer >= 1) or a fraction in (0, 1), "
                           f"got {limit!r}")
    include = values.get("include_path")
    if include is not None and not Path(str(include)).is_dir():
        raise VBShareError(f"harness.include_path={include} is not a folder; give the folder that holds your task YAMLs")
    return HarnessSettings(tasks=tuple(tasks), num_fewshot=whole("num_fewshot", 0, None), limit=limit,
                           batch_size=whole("batch_size", 1, 8), merge=bool(flag("merge", False)),
                           include_path=None if include is None else str(include),
                           chat_template=bool(flag("chat_template", False)),
                           add_bos_token=flag("add_bos_token", None), seed=whole("seed", 0, None))


def import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise VBShareError(f"the lm-evaluation-harness bridge needs lm-eval ({err}); install it with "
                           "pip install .[harness]") from None
    return lm_eval, HFLM, TaskManager


class _InMemoryModelNotice(logging.Filter):
    """Drops lm-eval's two warnings about a model passed in memory (single-process, arguments ignored): that is
    how this bridge hands over the adapted model, on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("`pretrained` model kwarg is not of type")
                    or message.startswith("Passed an already-initialized model through"))


@functools.lru_cache(maxsize=4)
def task_index(include_path: str | None):
    """lm-eval's TaskManager over its own tasks plus `include_path`: indexing its ~15,000 task files takes seconds,
    so one process builds it once per folder."""
    _, _, TaskManager = import_lm_eval()
    return TaskManager(include_path=include_path)


def resolve_tasks(task_manager, tasks: Sequence[str]) -> list[str]:
    """The registered names that `tasks` (names or glob patterns) stand for; one that matches nothing is refused
    before any model is built."""
    names: list[str] = []
    for pattern in tasks:
        matched = task_manager.match_tasks([pattern])
        if not matched:
            raise VBShareError(f"harness.tasks: lm-eval knows no task, group or tag {pattern!r} (lm_eval ls tasks "
                               "lists them; a task of your own needs harness.include_path=<folder of its YAML>)")
        names += [name for name in matched if name not in names]
    return names


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def prepare_tasks(settings: HarnessSettings) -> list[str]:
    """The task names `settings.tasks` stand for; lm-eval missing or a task it does not know is one line, before
    any model is built."""
    import_lm_eval()
    return resolve_tasks(task_index(settings.include_path), settings.tasks)


def score_model(model: nn.Module, tokenizer, settings: HarnessSettings, tasks: Sequence[str],
                autocast: contextlib.AbstractContextManager | None = None,
                samples_dir: str | Path | None = None) -> dict[str, Any]:
    """Score an (adapted) causal LM on lm-eval tasks (`prepare_tasks`' names), in memory: lm-eval's HFLM wraps the
    model as it is, `settings.merge` first folding its adapters into the base weights. `autocast`: the precision
    context to score under (the run's). `samples_dir` receives one samples_<task>.jsonl per task: each document's
    prompt arguments, target, responses and metric values.

    Returns {"tasks", "results": {task: {metric: value}}, "n_samples": {task: documents}, "settings": {...},
    "lm_eval": version}.
    """
    lm_eval, HFLM, _ = import_lm_eval()
    from jinja2 import TemplateError  # lm-eval's prompt templates (a dependency of lm-eval)

    tasks = list(tasks)
    if settings.chat_template and not getattr(tokenizer, "chat_template", None):
        raise VBShareError("harness.chat_template=true, but this run's tokenizer has no chat template; leave "
                           "harness.chat_template=false")
    model.eval()
    if settings.merge:
        merge(model)
    hf_logger = logging.getLogger("lm_eval.models.huggingface")
    notice = _InMemoryModelNotice()
    hf_logger.addFilter(notice)
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size,
                  add_bos_token=settings.add_bos_token)
    finally:
        hf_logger.removeFilter(notice)
    log.info("lm-eval %s: tasks %s%s", lm_eval.__version__, ", ".join(tasks),
             " (adapter merged)" if settings.merge else "")
    seeds = {} if settings.seed is None else {
        "random_seed": settings.seed, "numpy_random_seed": settings.seed, "torch_random_seed": settings.seed,
        "fewshot_random_seed": settings.seed}
    try:
        with autocast or contextlib.nullcontext():
            output = lm_eval.simple_evaluate(
                model=lm, tasks=tasks, num_fewshot=settings.num_fewshot, limit=settings.limit,
                task_manager=task_index(settings.include_path), log_samples=samples_dir is not None,
                apply_chat_template=settings.chat_template, **seeds)
    except FileNotFoundError as err:
        raise VBShareError(f"lm-eval could not read a data file of {', '.join(tasks)} ({first_line(err)}); check "
                           "the task YAML's data_files paths") from None
    except (ConnectionError, OSError) as err:
        raise VBShareError(f"lm-eval could not load the data of {', '.join(tasks)} ({first_line(err)}); its tasks "
                           "download their datasets from the Hub on first use: run once where the Hub is "
                           "reachable, or point a task of your own at a local file") from None
    except (ValueError, KeyError, TypeError, TemplateError) as err:  # lm-eval's refusals: a bad task YAML, ...
        raise VBShareError(f"lm-eval stopped on {', '.join(tasks)}: {first_line(err)}") from None
    results = {name: plain(metrics) for name, metrics in output["results"].items()}
    if samples_dir is not None:
        write_samples(Path(samples_dir), output.get("samples", {}))
    return {"tasks": tasks, "results": results,
            "n_samples": {name: counts.get("effective") for name, counts in output.get("n-samples", {}).items()},
            "settings": {"num_fewshot": settings.num_fewshot, "limit": settings.limit, "merge": settings.merge,
                         "chat_template": settings.chat_template, "seed": settings.seed,
                         "include_path": settings.include_path},
            "lm_eval": lm_eval.__version__}


def plain(metrics: dict[str, Any]) -> dict[str, Any]:
    """One task's metrics as JSON values: lm-eval's "metric,filter" keys kept, its "N/A" errors as None."""
    out = {}
    for key, value in metrics.items():
        if key == "alias":
            continue
        out[key] = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    return out


def write_samples(folder: Path, samples: dict[str, list[dict]]) -> None:
    """samples_<task>.jsonl per task: doc_id, the request arguments, target, raw and filtered responses and each
    metric's value for that document (what lm-eval logged, as JSON)."""
    for name, rows in samples.items():
        lines = []
        for row in rows:
            kept = {k: row[k] for k in ("doc_id", "arguments", "target", "resps", "filtered_resps") if k in row}
            kept.update({k: v for k, v in row.items() if k not in kept and k not in ("doc", "doc_hash", "prompt_hash",
                                                                                     "target_hash")})
            lines.append(json.dumps(kept, default=str))
        atomic_write(folder / SAMPLES.format(task=name), ("\n".join(lines) + "\n").encode())
