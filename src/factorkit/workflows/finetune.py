"""Fine-tuning a causal LM on a text with a WaRA adapter, a LoRA adapter (the
real ``peft`` package) or all of its weights, through the shared loop.

    result = finetune(FinetuneConfig(model="smollm2-135m", adapter="wara", r=8, text="my.txt"))

The text is split into training and held-out text (``data.train_heldout_text``:
for shakespeare the calibration plays and the held-out plays, for general its
calib and eval splits), cut into rows of ``seq_len`` tokens; perplexity on the
first ``eval_rows`` held-out rows is measured before and after training. WaRA and LoRA target the same Linears at
the same rank and alpha, so they train the same number of parameters.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ..surgery import find_blocks, model_targets, target_linears
from ..data import pretrain_rows, train_heldout_text
from ..errors import FactorkitError
from ..eval import perplexity
from ..eval.perplexity import check_token_ids
from ..adapters.wara import WaRAConfig, get_wara_model, save_adapter, trainable_parameters
from ..config import Config, ConfigError, nested, non_negative, option, positive, positive_int, whole
from ..training.loop import TrainConfig, model_loss, train

ADAPTERS = ("wara", "lora", "full")


@dataclass
class FinetuneConfig(Config):
    """What to fine-tune, with which adapter, on which text; ``train`` is the loop."""

    model: str = option("smollm2-135m", "model to fine-tune")
    adapter: str = option("wara", "wara (wavelet low-rank), lora (PEFT's LoraConfig) or full (every weight trains)",
                          choices=ADAPTERS)
    r: int = option(8, "adapter rank", check=positive_int, when=("adapter", ("wara", "lora")))
    alpha: float = option(16.0, "the update is scaled by alpha / r", check=positive,
                          when=("adapter", ("wara", "lora")))
    dropout: float = option(0.0, "adapter input dropout", check=lambda v: None if non_negative(v) is None and v < 1
                            else f"must lie in [0, 1), got {v!r}.", when=("adapter", ("wara", "lora")))
    wavelet: str = option("db2", "wara: orthogonal wavelet, e.g. haar, db2, db4, sym4", when=("adapter", "wara"))
    levels: int = option(2, "wara: levels of the 2-D transform", check=positive_int, when=("adapter", "wara"))
    target_modules: tuple[str, ...] | None = option(
        None, "comma-separated Linear names to adapt, e.g. q_proj,v_proj (default: all)", flag="targets",
        when=("adapter", ("wara", "lora")))
    text: str = option("shakespeare", "shakespeare (calibration plays; the others held out), general (its calib "
                                      "split; eval held out), wikitext2, c4 or a text file (its last 10% held out)")
    seq_len: int = option(256, "tokens per sequence", check=whole(2))
    eval_rows: int = option(32, "held-out sequences evaluated", check=positive_int)
    train: TrainConfig = nested(TrainConfig, "the training loop", hide=("distill", "temperature"),
                                steps=200, lr=2e-4, warmup=None, batch_size=4, checkpoint_every=50)

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = tuple(t.strip() for t in self.target_modules.split(",") if t.strip())
        if self.target_modules is not None and (not self.target_modules or
                                                not all(isinstance(t, str) for t in self.target_modules)):
            raise ConfigError("target_modules", f"must be Linear names such as q_proj, got {self.target_modules!r}.")
        super().__post_init__()


@dataclass
class FinetuneResult:
    model: nn.Module
    tokenizer: object
    perplexity_before: float
    perplexity_after: float
    trainable: int
    total: int
    seconds: float  # wall time of the training steps run in this call
    steps_run: int
    losses: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        return {"perplexity_before": self.perplexity_before, "perplexity_after": self.perplexity_after,
                "trainable": self.trainable, "total": self.total, "seconds": self.seconds,
                "step_seconds": self.seconds / max(1, self.steps_run), "losses": self.losses}


def target_names(model: nn.Module, targets: tuple[str, ...] | None) -> list[str]:
    """The Linear names (inside a block) both adapters target, e.g. ["q_proj", "v_proj"]."""
    found = model_targets(model, targets)
    first = find_blocks(model)[1][0]
    unmatched = [t for t in targets or () if not target_linears(first, [t])]
    if not found or unmatched:  # a misspelt name is refused, never dropped
        raise FactorkitError(f"no Linear layer in the blocks matches target_modules "
                             f"{unmatched or list(targets or [])}; "
                             f"the first block has: {', '.join(target_linears(first)) or 'none'}.")
    return sorted({name.rsplit(".", 1)[-1] for name in found})


def attach(model: nn.Module, config: FinetuneConfig) -> nn.Module:
    """The model to train: WaRA or LoRA adapters on the targets, or the model itself (full)."""
    names = target_names(model, config.target_modules)
    if config.adapter == "wara":
        return get_wara_model(model, WaRAConfig(tuple(names), config.r, config.alpha, config.wavelet, config.levels,
                                                config.dropout))
    if config.adapter == "lora":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                                                target_modules=names, task_type="CAUSAL_LM"))
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def finetune(config: FinetuneConfig, progress: bool = True, stop_after: int | None = None,
             model: nn.Module | None = None, tokenizer=None) -> FinetuneResult:
    """Fine-tune (or resume, from ``config.train.checkpoint_dir``); ``model`` / ``tokenizer``
    may be given already loaded, otherwise ``config.model`` is loaded."""
    given = model is not None
    if model is None:
        from ..models import load

        model, tokenizer = load(config.model)
    if tokenizer is None:
        raise FactorkitError(f"{config.model} has no tokenizer files; save the tokenizer beside the model.")
    if config.adapter != "full":
        target_names(model, config.target_modules)  # a misspelt target fails before any work
    train_text, heldout_text = train_heldout_text(config.text, config.train.seed)
    rows, heldout = pretrain_rows(tokenizer, train_text, heldout_text, config.seq_len)
    heldout = heldout[: config.eval_rows]
    if rows.shape[0] < config.train.batch_size:
        raise FactorkitError(f"the training text has {rows.shape[0]} sequences of {config.seq_len} tokens, fewer "
                             f"than one batch of {config.train.batch_size}; give more text or a smaller --batch-size.")
    for ids in (rows, heldout):
        check_token_ids(model, ids, "the tokenizer passed with the model does not match it; pass the model's own "
                                    "tokenizer" if given else "the tokenizer saved with the model does not match it; "
                                                              "save the model's own tokenizer beside it")
    before = perplexity(model, heldout, batch_size=4, progress=False,
                        nonfinite_hint="check the weights of the model to fine-tune").perplexity
    base = model.state_dict()  # the adapters start from the seed: the base weights tell runs apart
    model = attach(model, config)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    trained = train(model, rows, named, config.train, model_loss, progress=progress, stop_after=stop_after,
                    desc=f"finetune {config.adapter}", run={"finetune": config.to_dict(), "base": base},
                    nonfinite_hint="lower --lr")
    trainable, total = trainable_parameters(model)
    after = perplexity(model, heldout, batch_size=4, progress=False, nonfinite_hint="lower --lr").perplexity
    return FinetuneResult(model, tokenizer, before, after, trainable, total, trained.seconds,
                          len(trained.losses) - trained.resumed_from, trained.losses)


def save_finetuned(result: FinetuneResult, config: FinetuneConfig, out: str | os.PathLike,
                   overwrite: bool = False) -> Path:
    """Only the adapter for wara (factorkit's folder) and lora (PEFT's folder); the whole model for full."""
    if config.adapter == "wara":
        return save_adapter(result.model, out, overwrite, base_model=config.model)
    if config.adapter == "lora":
        from ..models.files import atomic_dir

        with atomic_dir(out, overwrite, protect=config.model) as tmp:
            result.model.save_pretrained(tmp)
        return Path(out)
    from ..models import save

    return save(result.model, out, tokenizer=result.tokenizer, overwrite=overwrite, protect=config.model)

