"""Score a finished training run again, on any split or data set, and write its predictions.

    python -m vbshare.evaluate run_dir=RUN [split=test] [predictions=true] [out=FOLDER] [data=NAME] [check_base=false]
                               [KEY=VALUE ...]
    python -m vbshare.evaluate run_dir=RUN harness.tasks=[TASK,...] [harness.KEY=VALUE ...] [out=FOLDER]

    evaluate_run(run_dir, split="test", overrides=(), predictions_path=None, check_base=True) -> dict

A run folder is data, never code: the config is composed again from the project's own configs/ with the
overrides the run recorded (its overrides.json), never instantiated from the folder. The composed config must
agree with the run's resolved config (read as plain YAML) on what decides the scores (model, data, the adapter's
hyperparameters and targets, seed, trainer.max_examples), and every `_target_` in it must be one of vbshare's
own builders; anything else is refused in one line. The training app's setup code then builds the task and a
fresh base model, and the run mode loads what the run left (`adapter/` with the head, a full fine-tune's
`model/`, a head-only run's head: safetensors and JSON only) onto that base. Overrides use Hydra's syntax:
`data=NAME` picks another data config (composed from configs/data/ with the run's other settings),
`data.KEY=VALUE` and `trainer.KEY=VALUE` change single keys (e.g. `trainer.max_examples=null` scores a whole
split that the run capped, `trainer.device=cpu`).

An adapter is refused when the fresh base's weights are not those it was trained on (`vbshare.load_adapter`
compares a small sample of them); `check_base=false` loads it anyway.

Nothing in the run directory is written. The scores go to stdout as JSON; `predictions=true` (or `out=FOLDER`)
also writes scores.json and the predictions (one row per example: index, label, prediction, correct, loss,
class probabilities; a language model's per-example loss) into FOLDER, by default a new folder
`evaluations/<run name>-<split>-<time>/` under the current directory.

`harness.tasks=[...]` scores a causal-LM run on lm-evaluation-harness tasks instead (the `harness` extra,
vbshare/harness.py has its settings): the results go to stdout as JSON, and with out=FOLDER to harness.json
and one samples_<task>.jsonl per task.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from omegaconf import DictConfig, OmegaConf
from torch import nn

from .errors import VBShareError
from .files import atomic_write
from .harness import PREFIX as HARNESS_PREFIX
from .harness import HarnessSettings, prepare_tasks, read_harness_settings, score_model
from .records import flatten
from .rundir import PREDICTIONS, RunDir
from .train.app import CONFIG_DIR, USER_ERRORS, exit_with
from .train.engine import Engine
from .train.evaluation import format_scores, score_split, write_predictions
from .train.modes import run_mode
from .train.settings import read_settings
from .train.setup import build_task_and_model, check_builders, keep_trained_in_fp32, set_threads

log = logging.getLogger("vbshare.evaluate")

# What decides a finished run's scores: the composed config must agree with the run's resolved config on these
# (dotted prefixes), except the adapter keys that only steer training and tuning.
DECISIVE_KEYS = ("model", "data", "adapter", "seed", "trainer.max_examples")
# (adapter.search / adapter.size_key: in the configs of runs made before compare's spaces moved to configs/search/)
TRAINING_ONLY_KEYS = ("adapter.lr", "adapter.search", "adapter.size_key")
OWN_KEYS = ("run_dir", "split", "predictions", "out", "check_base")  # command-line keys of this app; the rest override the config
DATA_GROUP = "data"
DEFAULT_OUT_ROOT = "evaluations"
SCORES = "scores.json"
HARNESS_SCORES = "harness.json"


def parse_overrides(overrides: Sequence[str]) -> list[Override]:
    return OverridesParser.create().parse_overrides(list(overrides))


def recorded_overrides(run_dir: Path) -> list[str]:
    """The overrides the run was composed with (its overrides.json, read as JSON)."""
    folder = RunDir(run_dir)
    if not folder.config.is_file():
        raise VBShareError(f"{folder.config} is missing; run_dir must be a folder written by python -m vbshare.train")
    path = folder.overrides
    if not path.is_file():
        raise VBShareError(f"{path} is missing: evaluation rebuilds a run from configs/ and the overrides it recorded "
                           "there, and this run recorded none (trained by an older vbshare, or by run_training "
                           "without overrides=...); train it again to evaluate it")
    try:
        recorded = json.loads(path.read_text()).get("overrides")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise VBShareError(f"{path} is not a JSON object with an overrides list ({err}); the run folder is damaged") from None
    if not isinstance(recorded, list) or not all(isinstance(item, str) for item in recorded):
        raise VBShareError(f"{path} must hold {{\"overrides\": [strings]}}; the run folder is damaged")
    return recorded


def saved_config(run_dir: Path) -> dict[str, Any]:
    """The run's resolved config as plain data (yaml.safe_load: a Python tag is refused, never run)."""
    path = RunDir(run_dir).config
    try:
        saved = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise VBShareError(f"{path} is not plain YAML ({first}); the run folder is damaged") from None
    if not isinstance(saved, dict):
        raise VBShareError(f"{path} does not hold a config (a YAML mapping); the run folder is damaged")
    return saved


def compose_train(overrides: Sequence[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def decisive(config: dict[str, Any]) -> dict[str, Any]:
    """The DECISIVE_KEYS of a config, flattened to {dotted key: value}."""
    def within(key: str, prefixes: Sequence[str]) -> bool:
        return any(key == prefix or key.startswith(prefix + ".") for prefix in prefixes)
    return {k: v for k, v in flatten(config).items() if within(k, DECISIVE_KEYS) and not within(k, TRAINING_ONLY_KEYS)}


def check_same_as_run(composed: DictConfig, run_dir: Path) -> None:
    """Refuse a composed config that differs from the run's resolved config on what decides the scores."""
    now, then = decisive(OmegaConf.to_container(composed, resolve=True)), decisive(saved_config(run_dir))
    for key in sorted(set(now) | set(then)):
        if key not in then and now[key] is None:
            continue  # a setting added to configs/ since the run, off by default (e.g. model.quantization)
        if now.get(key, "<absent>") != then.get(key, "<absent>"):
            raise VBShareError(
                f"{key} is {then.get(key, '<absent>')!r} in {RunDir(run_dir).config} but {now.get(key, '<absent>')!r} "
                "when configs/ are composed with the run's recorded overrides: the project's configs changed since "
                "the run; evaluate it with the configs it was trained with")


def run_config(run_dir: Path, overrides: Sequence[str] = ()) -> DictConfig:
    """The run's config, composed from configs/ with its recorded overrides and checked against its resolved config,
    then the evaluation's overrides applied (a `data=NAME` override composes that data config instead)."""
    recorded = recorded_overrides(run_dir)
    cfg = compose_train(recorded)
    check_same_as_run(cfg, run_dir)
    parsed = parse_overrides(overrides)
    group = [o for o in parsed if o.key_or_group == DATA_GROUP]
    data_keys = [o for o in parsed if o.key_or_group.startswith(DATA_GROUP + ".")]
    if group:  # another data config: composed as the training app would, with this run's other settings
        kept = [o.input_line for o in parse_overrides(recorded)
                if o.key_or_group != DATA_GROUP and not o.key_or_group.startswith(DATA_GROUP + ".")]
        composed = compose_train([*kept, *(o.input_line for o in group + data_keys)])
        cfg.data = OmegaConf.create(OmegaConf.to_container(composed.data, resolve=True))
        parsed = [o for o in parsed if o not in group and o not in data_keys]
    OmegaConf.set_struct(cfg, True)  # a typo'd key is an error, not a silently ignored setting
    for override in parsed:
        if override.is_add() or override.is_delete():
            raise VBShareError(f"{override.input_line}: only KEY=VALUE and data=NAME overrides apply to a finished run")
        try:
            OmegaConf.update(cfg, override.key_or_group, override.value(), merge=True)
        except Exception as err:
            raise VBShareError(f"{override.input_line}: {str(err).splitlines()[0]}") from None
    check_builders(cfg)
    return cfg


def check_outside(path: Path, run_dir: Path) -> None:
    resolved, run = path.resolve(), run_dir.resolve()
    if resolved == run or run in resolved.parents:
        raise VBShareError(f"{path} lies inside the run directory {run_dir}, which evaluation never writes to; "
                           "choose a folder outside it")


def evaluate_run(run_dir: str | Path, split: str = "test", overrides: Sequence[str] = (),
                 predictions_path: str | Path | None = None, check_base: bool = True) -> dict[str, Any]:
    """Load a finished run's trained weights onto a fresh base, score one split and optionally write
    the per-example predictions to `predictions_path` (outside the run directory). check_base=False loads an adapter
    into a base whose weights differ from those it was trained on.

    Returns {"run_dir", "split", "task", "metric", "scores": {metric: value, ...}, "examples",
    "predictions": the predictions file or None}.
    """
    run_dir = Path(run_dir)
    if predictions_path is not None:
        check_outside(Path(predictions_path), run_dir)
    cfg = run_config(run_dir, overrides)
    trainer = read_settings(cfg).trainer  # the overrides' ranges checked, as a training run checks them
    engine = Engine(trainer)
    try:
        if engine.device.type == "cpu":
            set_threads(trainer.num_threads)
        task, model, tokenizer, data = rebuild_trained(cfg, run_dir, engine, check_base, split)
        scores, rows = score_split(model, task, data[split], engine, trainer.eval_batch_size,
                                   tokenizer.pad_token_id or 0, tokenizer)
        is_main = engine.is_main
    finally:
        engine.end()
    log.info("%s %s %s", run_dir, split, format_scores(scores))
    if predictions_path is not None and is_main:
        write_predictions(Path(predictions_path), rows)
    return {"run_dir": str(run_dir), "split": split, "task": task.name, "metric": task.metric, "scores": scores,
            "examples": len(data[split]), "predictions": None if predictions_path is None else str(predictions_path)}


def evaluate_with_harness(run_dir: str | Path, settings: HarnessSettings, overrides: Sequence[str] = (),
                          check_base: bool = True, samples_dir: str | Path | None = None) -> dict[str, Any]:
    """Score a finished causal-LM run on lm-evaluation-harness tasks (vbshare/harness.py): the run rebuilt as for
    `evaluate_run` (only one example per split of its own data tokenised: `trainer.max_examples=1`), then its
    adapted model handed to lm-eval in memory, under the run's precision. `samples_dir` (outside the run) receives
    one samples_<task>.jsonl per task.

    Returns {"run_dir", "tasks", "results": {task: {metric: value}}, "n_samples", "settings", "lm_eval"}.
    """
    run_dir = Path(run_dir)
    if samples_dir is not None:
        check_outside(Path(samples_dir), run_dir)
    tasks = prepare_tasks(settings)  # before any model is built
    if not any(o.split("=", 1)[0] == "trainer.max_examples" for o in overrides):
        overrides = [*overrides, "trainer.max_examples=1"]  # the model is what is scored; the run's data is not
    cfg = run_config(run_dir, overrides)
    if settings.merge and cfg.model.get("quantization"):
        raise VBShareError(f"harness.merge=true folds the adapter into base weights, and this run's base is "
                           f"{cfg.model.quantization}-quantized; leave harness.merge=false to score it unmerged")
    trainer = read_settings(cfg).trainer
    engine = Engine(trainer)
    try:
        if engine.distributed:
            raise VBShareError("the lm-eval bridge runs in one process (lm-eval batches on its own); start it with "
                               "python, not torchrun or accelerate launch")
        if engine.device.type == "cpu":
            set_threads(trainer.num_threads)
        task, model, tokenizer, _ = rebuild_trained(cfg, run_dir, engine, check_base)
        if task.kind != "lm" or not hasattr(model, "generate"):
            raise VBShareError(f"lm-eval tasks score a causal language model, and this run trained a {task.kind} "
                               f"model on {task.name}; score it with python -m vbshare.evaluate run_dir=... split=test")
        log.info("scoring %s with lm-evaluation-harness", run_dir)
        result = score_model(model, tokenizer, settings, tasks, engine.autocast(), samples_dir)
    finally:
        engine.end()
    return {"run_dir": str(run_dir), **result}


def rebuild_trained(cfg: DictConfig, run_dir: Path, engine: Engine, check_base: bool = True,
                    split: str | None = None) -> tuple[Any, nn.Module, Any, dict]:
    """A fresh base built as the training app builds it, with what the run trained (`adapter/` with the head, a
    full fine-tune's `model/`, a head-only run's head) loaded onto it: (task, model, tokenizer, splits). `split`,
    when given, must be a non-empty split of the task."""
    task, model, tokenizer, data = build_task_and_model(cfg, engine.device)
    if split is not None and (split not in data or not len(data[split])):
        raise VBShareError(f"the task {task.name} has no {split} split to score; choose split= one of "
                           f"{', '.join(s for s in data if len(data[s]))}")
    check_same_labels(task.label_names, run_dir)
    mode = run_mode(cfg, task.kind)
    model.requires_grad_(False)  # the head in fp32, as it trained (a lower-precision base stays as loaded)
    mode.train_heads(model)
    keep_trained_in_fp32(model, engine.precision)
    model = mode.load_outputs(model, run_dir, check_base=check_base).to(engine.device)
    return task, model, tokenizer, data


def check_same_labels(label_names: Sequence[str], run_dir: Path) -> None:
    """Refuse data whose classes differ from those the run trained on: class ids come from the sorted label
    names, so another label set would be scored against the wrong head rows without any error."""
    folder = RunDir(run_dir)
    trained = folder.read_summary().get("label_names") if folder.finished else None
    if trained and list(label_names) != list(trained):
        raise VBShareError(f"the data's labels {list(label_names)} are not the labels this run trained on "
                           f"{list(trained)}; score data with the same label set")


def default_out(run_dir: Path, split: str) -> Path:
    return Path(DEFAULT_OUT_ROOT) / f"{run_dir.resolve().name}-{split}-{time.strftime('%Y%m%d-%H%M%S')}"


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry: scores as JSON on stdout; bad input -> one `error: ...` line and exit status 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(arg in ("-h", "--help") for arg in args):
        print(__doc__.split("\n\n")[1].strip("\n"))
        print("\n" + "\n\n".join(__doc__.split("\n\n")[2:]).strip())
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        parsed = parse_overrides(args)
        own = {o.key_or_group: o.value() for o in parsed if o.key_or_group in OWN_KEYS}
        if "run_dir" not in own:
            raise VBShareError("run_dir=RUN is required: the folder of a finished python -m vbshare.train run")
        run_dir, split = Path(str(own["run_dir"])), str(own.get("split", "test"))
        out = own.get("out")
        folder = Path(str(out)) if out else default_out(run_dir, split) if own.get("predictions") else None
        if folder is not None:
            check_outside(folder, run_dir)
        check_base = own.get("check_base", True)
        if not isinstance(check_base, bool):
            raise VBShareError(f"check_base must be true or false, got {check_base!r}")
        harness = {o.key_or_group[len(HARNESS_PREFIX):]: o.value() for o in parsed
                   if o.key_or_group.startswith(HARNESS_PREFIX)}
        rest = [o.input_line for o in parsed
                if o.key_or_group not in OWN_KEYS and not o.key_or_group.startswith(HARNESS_PREFIX)]
        if harness:
            if "split" in own or "predictions" in own:
                raise VBShareError("split= and predictions= do not apply to harness.tasks: each lm-eval task scores "
                                   "its own split; out=FOLDER keeps the per-document samples")
            folder = Path(str(out)) if out else None
            if folder is not None:
                check_outside(folder, run_dir)
            result = evaluate_with_harness(run_dir, read_harness_settings(harness), rest, check_base, folder)
        else:
            result = evaluate_run(run_dir, split, rest, None if folder is None else folder / PREDICTIONS, check_base)
    except USER_ERRORS as err:
        exit_with(err)
    if folder is not None:
        atomic_write(folder / (HARNESS_SCORES if harness else SCORES), json.dumps(result, indent=2).encode())
        log.info("%s in %s", "lm-eval results and samples" if harness else "scores and predictions", folder)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
