"""Loads a folder written by factorkit.save through transformers' Auto classes.

factorkit.save copies this file into every folder that holds factorized
layers and names it in config.json's ``auto_map``: those layers have no
transformers class, so a plain ``from_pretrained`` must not build the dense
architecture and leave them randomly initialised. transformers therefore
refuses the folder unless asked to run this file, and then

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

hands the folder to factorkit (``pip install factorkit``), which rebuilds the
saved model exactly (``factorkit.json`` names every factor module). The
architecture's own config is kept under ``factorkit_base_config``.
"""

import os

from transformers import PretrainedConfig, PreTrainedModel


class FactorkitConfig(PretrainedConfig):
    model_type = "factorkit"


class FactorkitModel(PreTrainedModel):
    config_class = FactorkitConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, dtype=None, torch_dtype=None, **kwargs):
        import factorkit

        path = str(pretrained_model_name_or_path)
        if not os.path.isdir(path):  # a Hub id: factorkit reads a local folder
            from huggingface_hub import snapshot_download

            path = snapshot_download(path, revision=kwargs.get("revision"), token=kwargs.get("token"),
                                     cache_dir=kwargs.get("cache_dir"))
        dtype = dtype if dtype is not None else torch_dtype
        return factorkit.load(path, None if dtype == "auto" else dtype)
