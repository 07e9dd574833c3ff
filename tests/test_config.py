"""Configs: every field carries its help, checks run when a config is built, and
to_dict / from_dict rebuild the same config (factorkit.json rebuilds the one
that made a model)."""

import dataclasses
import typing

import pytest

import factorkit as fk
from factorkit.api import CompressJob, FinetuneJob, PretrainJob
from factorkit.config import ConfigError, config_type
from factorkit.methods import METHODS
from factorkit.training import TrainConfig
from factorkit.workflows.finetune import FinetuneConfig
from factorkit.workflows.pretrain import PretrainConfig

# one non-default setting per config, so a round trip that dropped a field would show
NON_DEFAULT = {
    "svd": {"ratio": 0.35, "targets": ("q_proj", "v_proj"), "allocation": "global", "min_rank": 8},
    "asvd": {"alpha": 0.25, "fisher_samples": 4, "allocation": "global"},
    "svdllm": {"batch_size": 2, "eps": 1e-5, "heal": 7, "heal_train": TrainConfig(lr=2e-4, distill=0.5)},
    "fwsvd": {"whiten": True, "fisher_axis": "out", "fisher_samples": 3},
    "cospadi": {"rho": 3.0, "iterations": 7, "refresh": 4, "group": 2, "count": "storage", "whiten": False},
    "auto": {"types": ("dictionary",), "rank_options": 9, "probe_iterations": 3, "iterations": 5, "seed": 2,
             "max_removal": 0.5, "price_metric": "gram"},
    "dsformer": {"pattern": "2:4", "blocks": 2, "init": "random", "stf": False,
                 "train": TrainConfig(steps=9, lr=3e-3, distill=0.5, seed=3)},
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_config_round_trips_through_a_dict(name):
    cls = METHODS[name].config_cls
    config = cls(**NON_DEFAULT[name])
    again = fk.CompressionConfig.from_dict(config.to_dict())  # the base class picks the method by name
    assert type(again) is cls and again.to_dict() == config.to_dict()
    assert cls.from_dict(config.to_dict()) == again


@pytest.mark.parametrize("cls", [TrainConfig, PretrainConfig, FinetuneConfig, CompressJob, PretrainJob, FinetuneJob,
                                 *(m.config_cls for m in METHODS.values())])
def test_every_option_has_help_and_its_default_passes_its_own_checks(cls):
    config, hints = cls(), typing.get_type_hints(cls)  # defaults run
    for f in cls.options():
        assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"
        if config_type(hints[f.name]) is not None:
            assert isinstance(getattr(config, f.name), config_type(hints[f.name]))


def test_a_config_cannot_exist_with_an_invalid_value_nor_be_left_invalid():
    with pytest.raises(ConfigError, match="ratio must lie in"):
        fk.SVDLLMConfig(ratio=1.0)
    config = fk.CoSpaDiConfig()
    config.iterations = 0  # changed in place: validate() checks again
    with pytest.raises(ConfigError, match="iterations must be a whole number of at least 1"):
        config.validate()
    with pytest.raises(fk.FactorkitError, match="has no setting 'steps'"):
        fk.DSFormerConfig.from_dict({"steps": 3})  # training settings live in the nested TrainConfig
    assert dataclasses.replace(fk.FWSVDConfig(), whiten=True).axis == "out"  # the default follows whiten


def test_saved_folder_rebuilds_the_config_that_made_it(llama, calib, tmp_path):
    config = fk.CoSpaDiConfig(ratio=0.3, iterations=2, rho=3.0, checkpoint_dir=str(tmp_path / "ck"))
    report = fk.compress(llama, config, calib, progress=False)
    fk.save(llama, tmp_path / "m")
    record = fk.compression_record(fk.load(tmp_path / "m"))
    rebuilt = fk.CompressionConfig.from_dict(record["config"])
    assert rebuilt == dataclasses.replace(config, checkpoint_dir=None)  # where it resumed from is not recorded
    assert record["kept_dense"] == report.kept_dense
