"""A run folder, an adapter folder and a checkpoint are data, never code.

Every test plants a payload that, if it ran, would create a harmless marker file (`open(marker, "w")` through
pickle's `__reduce__`, a `_target_`, or a YAML python tag), hands the folder to the code that reads such
folders (resume, evaluate, report, load_adapter, import_peft), and asserts two things: the reader refuses or
ignores the payload with a one-line error, and the marker never appears. Restoring `weights_only=False` in
`vbshare.files.read_tensors`, or instantiating the run's config.yaml in `vbshare.evaluate`, makes these fail.
"""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir

import vbshare
from vbshare import VBShareError
from vbshare.train import CONFIG_DIR, run_training

FAST = ["+adapter=lora", "model=tiny_bert", "trainer=debug", "data.max_length=32"]


class Payload:
    """Unpickling this calls open(marker, "w"): the marker file appears only if the pickle ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def plant_pickle(path: Path, marker: Path, wrap=lambda payload: {"optimizer": payload}) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        pickle.dump(wrap(Payload(marker)), handle)


def torch_pickle(path: Path, marker: Path) -> None:
    """The payload inside a file torch.save wrote (a zip archive with data.pkl), as a checkpoint would be."""
    torch.save({"optimizer": Payload(marker), "rng": {}}, path)


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=overrides)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One finished LoRA run and one stopped at step 2 (a checkpoint, resumable), trained once for the module."""
    root = tmp_path_factory.mktemp("runs")
    run_training(compose_train(FAST), root / "finished", FAST)
    stopped = [*FAST, "trainer.stop_at_step=2"]
    run_training(compose_train(stopped), root / "stopped", stopped)
    return {"finished": root / "finished", "stopped": root / "stopped"}


@pytest.fixture
def copy_of(runs, tmp_path):
    def copy(which: str) -> Path:
        return Path(shutil.copytree(runs[which], tmp_path / which))
    return copy


@pytest.fixture
def marker(tmp_path) -> Path:
    path = tmp_path / "MARKER"
    yield path
    assert not path.exists(), "a payload planted in a folder ran"


def resume(run_dir: Path) -> None:
    overrides = [*FAST, f"trainer.resume={run_dir}"]
    run_training(compose_train(overrides), run_dir, overrides)


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


# -- checkpoints: resume never unpickles ----------------------------------------------------------------------
@pytest.mark.parametrize("write", [plant_pickle, torch_pickle], ids=["raw-pickle", "torch-save"])
def test_pickle_in_the_optimiser_file_is_refused_on_resume(copy_of, marker, write):
    run = copy_of("stopped")
    write(run / "checkpoint" / "trainer_tensors.pt", marker)
    with pytest.raises(VBShareError) as err:
        resume(run)
    assert "holds more than tensors and plain values" in one_line(err) or "not a readable tensor file" in str(err.value)


def test_pickle_in_an_old_style_trainer_state_is_never_loaded(copy_of, marker):
    """The older single pickled trainer_state.pt is refused by name, before anything reads it."""
    run = copy_of("stopped")
    shutil.rmtree(run / "checkpoint")
    plant_pickle(run / "checkpoint" / "trainer_state.pt", marker)
    with pytest.raises(VBShareError, match="older pickled format") as err:
        resume(run)
    one_line(err)


def test_refused_resume_reads_no_tensor_before_the_settings_check(copy_of, marker):
    """A resume with other settings is refused from the JSON state alone: the planted tensor file is not opened."""
    run = copy_of("stopped")
    torch_pickle(run / "checkpoint" / "trainer_tensors.pt", marker)
    overrides = [*FAST, "adapter.r=4", f"trainer.resume={run}"]
    with pytest.raises(VBShareError, match="cannot resume") as err:
        run_training(compose_train(overrides), run, overrides)
    one_line(err)


def test_pickle_in_a_full_fine_tune_weights_file_is_refused(tmp_path, marker):
    overrides = ["+adapter=full", *FAST[1:], "trainer.stop_at_step=2"]
    run = tmp_path / "full"
    run_training(compose_train(overrides), run, overrides)
    torch_pickle(run / "checkpoint" / "weights.pt", marker)
    resumed = ["+adapter=full", *FAST[1:], f"trainer.resume={run}"]
    with pytest.raises(VBShareError, match="holds more than tensors and plain values") as err:
        run_training(compose_train(resumed), run, resumed)
    one_line(err)


# -- run configs: evaluate composes from configs/, never instantiates the folder's config ----------------------
def evaluate_refused(run: Path, match: str) -> None:
    from vbshare.evaluate import evaluate_run
    with pytest.raises(VBShareError, match=match) as err:
        evaluate_run(run)
    one_line(err)


def test_target_in_config_yaml_is_never_instantiated(copy_of, marker):
    run = copy_of("finished")
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"] = {"_target_": "builtins.open", "file": str(marker), "mode": "w"}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    evaluate_refused(run, "data")


def test_target_in_recorded_overrides_is_refused(copy_of, marker):
    """An override that points a builder elsewhere fails the allow-list of vbshare's own builders."""
    run = copy_of("finished")
    recorded = json.loads((run / "overrides.json").read_text())
    recorded["overrides"].append("+data.extra={_target_:builtins.open,file:'" + str(marker) + "',mode:w}")
    (run / "overrides.json").write_text(json.dumps(recorded))
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"]["extra"] = {"_target_": "builtins.open", "file": str(marker), "mode": "w"}
    (run / "config.yaml").write_text(yaml.safe_dump(config))  # config.yaml agrees, so only the allow-list stops it
    evaluate_refused(run, "_target_")


def test_data_target_outside_vbshare_is_refused(copy_of, marker):
    run = copy_of("finished")
    recorded = json.loads((run / "overrides.json").read_text())
    recorded["overrides"].append("data._target_=builtins.open")
    (run / "overrides.json").write_text(json.dumps(recorded))
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"]["_target_"] = "builtins.open"
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    evaluate_refused(run, "_target_")


PYTHON_TAG = "!!python/object/apply:builtins.open ['{marker}', 'w']\n"


def test_yaml_python_tag_is_never_constructed_by_evaluate(copy_of, marker):
    run = copy_of("finished")
    (run / "config.yaml").write_text("seed: " + PYTHON_TAG.format(marker=marker))
    evaluate_refused(run, "config.yaml")


def test_yaml_python_tag_is_never_constructed_by_report(copy_of, marker, tmp_path, capsys):
    from vbshare.report import main
    run = copy_of("finished")
    (run / "config.yaml").write_text("seed: " + PYTHON_TAG.format(marker=marker))
    assert main([str(run.parent), "--out", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config.yaml is not valid YAML" in err[0], err


# -- adapter folders: safetensors + JSON only ----------------------------------------------------------------
PICKLED_NAMES = ["adapter_model.bin", "pytorch_model.bin", "head.pt"]


def test_pickles_beside_the_safetensors_are_never_read_by_evaluate(copy_of, marker):
    from vbshare.evaluate import evaluate_run
    run = copy_of("finished")
    for name in PICKLED_NAMES:
        torch_pickle(run / "adapter" / name, marker)
    assert "accuracy" in evaluate_run(run)["scores"]


def test_pickle_in_place_of_the_safetensors_is_refused_by_load_adapter(copy_of, marker):
    run = copy_of("finished")
    torch_pickle(run / "adapter" / "adapter_model.safetensors", marker)
    from transformers import BertConfig, BertForSequenceClassification
    model = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=64, num_labels=5))
    with pytest.raises(VBShareError) as err:
        vbshare.load_adapter(model, run / "adapter")
    one_line(err)


def test_peft_folder_with_a_pickled_bin_beside_is_read_from_safetensors_only(tmp_path, marker):
    from transformers import BertConfig, BertModel
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    model = vbshare.inject(BertModel(config), "lora", targets=["query", "value"], r=2)
    vbshare.export_peft(model, tmp_path / "peft")
    torch_pickle(tmp_path / "peft" / "adapter_model.bin", marker)
    torch.manual_seed(0)
    vbshare.import_peft(BertModel(config), tmp_path / "peft")


def test_peft_folder_whose_safetensors_is_a_pickle_is_refused(tmp_path, marker):
    from transformers import BertConfig, BertModel
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    model = vbshare.inject(BertModel(config), "lora", targets=["query", "value"], r=2)
    vbshare.export_peft(model, tmp_path / "peft")
    torch_pickle(tmp_path / "peft" / "adapter_model.safetensors", marker)
    with pytest.raises(VBShareError, match="not a readable PEFT adapter folder") as err:
        vbshare.import_peft(BertModel(config), tmp_path / "peft")
    one_line(err)


def test_a_method_name_from_a_run_folder_never_chooses_a_search_file(tmp_path):
    """The report reads a run's size knob from configs/search/<method>.yaml; a method name that is a path (from a
    tampered config.yaml) must not load a YAML file elsewhere on disk."""
    from vbshare.search_spaces import SEARCH_DIR, read_search
    planted = tmp_path / "planted.yaml"
    planted.write_text("size_key: ${oc.env:HOME}\n")
    relative = Path(*[".."] * len(SEARCH_DIR.parts)) / planted.with_suffix("").relative_to("/")
    assert (SEARCH_DIR / f"{relative}.yaml").resolve() == planted.resolve()  # the path would reach it
    assert read_search(str(relative)).size_key is None
    assert read_search("vera").size_key == "r"  # a real method's file still reads
