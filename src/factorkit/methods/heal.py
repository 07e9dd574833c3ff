"""Healing: a short distillation of the compressed model from the dense one.

After a training-free method (SVD, ASVD, SVD-LLM, FWSVD, CoSpaDi) the model
is trained for ``heal`` steps on the calibration text with its next-token loss
plus ``heal_train.distill`` * T^2 * KL(dense || compressed) on the logits, the
objective of the training loop DSFormer uses. Only the factors train (low-rank
U and V, dictionary atoms and code values, their biases); everything the
method left as it was, and every matrix it kept dense, stays frozen. The
supports of sparse codes stay fixed (a dictionary's code values train where
they are). With ``heal_train.checkpoint_dir`` the run is resumable, as every
run of the training loop: a rerun continues to the same weights. The loop
runs each micro-batch of token ids in pieces of rows whose logits fit
``training.loop.MAX_LOGITS`` (the same gradient): a 262k vocabulary at
4 x 512 tokens would otherwise hold about 19 GiB in one pass.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ..errors import FactorkitError
from ..factors import factor_parameters
from ..training import model_loss, train, train_rows
from .base import CompressionConfig, log


def heal(model: nn.Module, teacher: nn.Module, data: Any, config: CompressionConfig, progress: bool = True,
         stop_after: int | None = None) -> dict:
    """Train ``model``'s factors for ``config.heal`` steps towards ``teacher`` (the dense model) on ``data``.
    Returns the loss of every step, the seconds, where a resumed run started and how many sequences it
    trained on."""
    tc = dataclasses.replace(config.heal_train, steps=config.heal)
    params = factor_parameters(model)
    if not params:
        raise FactorkitError(f"{config.method} left every targeted matrix dense, so there is nothing to heal; "
                             "drop --heal or raise --ratio.")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    def loss_fn(m: nn.Module, batch) -> torch.Tensor:
        return model_loss(m, batch, teacher, tc.distill, tc.temperature)

    rows = train_rows(data, "healing")
    result = train(model, rows, params, tc, loss_fn, progress=progress, desc="heal",
                   stop_after=stop_after, run={"method": config.to_dict(), "stage": "heal"},
                   nonfinite_hint="lower --heal-lr, or use --dtype float32")
    losses = result.losses
    if losses:
        log.info("heal: %d steps in %.0f s, loss %.4f -> %.4f", len(losses), result.seconds, losses[0], losses[-1])
    return {"losses": losses, "seconds": result.seconds, "resumed_from": result.resumed_from,
            "trained_parameters": sum(p.numel() for _, p in params), "sequences": int((rows["input_ids"] if isinstance(rows, dict) else rows).shape[0])}
