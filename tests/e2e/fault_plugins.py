"""A digits plugin that misbehaves on purpose at the sites told to, for the fault tests.

A site's task config may carry ``fault``: ``crash`` (the trainer process dies mid-training),
``hang`` (training never returns), ``nan`` (the update holds NaN). Every other site, and
every key the digits plugin knows, behaves exactly as the built-in plugin.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping
from typing import Any

import torch

from fedhpc.trainer.plugins import EvalOutput, TaskContext, TrainOutput
from fedhpc.trainer.tasks.digits import DigitsHyperparameters, DigitsTask

Context = TaskContext[DigitsHyperparameters]


def _without_fault(ctx: Context) -> tuple[Context, str | None]:
    fault = ctx.site_config.get("fault")
    clean = {k: v for k, v in ctx.site_config.items() if k != "fault"}
    return dataclasses.replace(ctx, site_config=clean), fault


class FaultyDigits(DigitsTask):
    def check_site_config(self, site_config: Mapping[str, Any]) -> None:
        super().check_site_config({k: v for k, v in site_config.items() if k != "fault"})

    def evaluate(self, weights: Any, ctx: Context) -> EvalOutput:
        return super().evaluate(weights, _without_fault(ctx)[0])

    def train(self, weights: Any, ctx: Context) -> TrainOutput:
        ctx, fault = _without_fault(ctx)
        if fault == "crash":
            os._exit(17)
        if fault == "hang":
            time.sleep(3600)
        output = super().train(weights, ctx)
        if fault == "nan":
            first = next(iter(output.weights))
            output.weights[first] = torch.full_like(output.weights[first], float("nan"))
        return output


def corrupting_runner(task: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """A site runner (site config ``runner``) whose trainer returns a corrupted update: it
    trains normally, then one byte of the uploaded update changes, so the bytes no longer
    match the sha256 in the result."""
    from fedhpc.trainer import run_task

    result = run_task(task, **kwargs)
    update = task.get("update") or {}
    if result.get("update") and update.get("path"):
        with open(update["path"], "r+b") as f:
            f.seek(-5, os.SEEK_END)
            byte = f.read(1)
            f.seek(-5, os.SEEK_END)
            f.write(bytes([byte[0] ^ 0xFF]))
    return result
