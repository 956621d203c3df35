"""FedBuff (Nguyen et al., 2022): buffered asynchronous aggregation.

Sites train continuously: a site gets its next task as soon as it reports, from the latest
version available then. Successful updates collect in a buffer; once it holds ``buffer_size``
(K) of them, one Aggregate takes them all, each with its own staleness. Updates that arrive
while that Aggregate is outstanding wait for the next one.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from fedhpc.coordinator.strategies.fedasync import AsyncConfigBase, AsyncStrategyBase, QueuedUpdate

__all__ = ["FedBuffConfig", "FedBuffStrategy"]


class FedBuffConfig(AsyncConfigBase):
    """``strategy: {name: fedbuff, ...}``: aggregate every K buffered updates."""

    name: Literal["fedbuff"] = Field(default="fedbuff", description="Selects this strategy.")
    buffer_size: int = Field(
        default=3, ge=1, description="K: successful updates buffered before one aggregation."
    )
    min_accepted: int = Field(
        default=1,
        ge=1,
        description="Updates of a buffer the aggregator must accept to commit; at most buffer_size.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> FedBuffConfig:
        if self.min_accepted > self.buffer_size:
            raise ValueError(
                f"min_accepted ({self.min_accepted}) exceeds buffer_size ({self.buffer_size}): "
                "no aggregation could ever commit"
            )
        return self


class FedBuffStrategy(AsyncStrategyBase[FedBuffConfig]):
    """FedBuff: one server version per K buffered updates."""

    name: ClassVar[str] = "fedbuff"
    hold_slot_until_aggregated: ClassVar[bool] = False

    @property
    def min_accepted(self) -> int:
        return self.config.min_accepted

    def _take_batch(self, buffer: list[QueuedUpdate]) -> list[QueuedUpdate]:
        # Everything buffered, possibly more than K after an Aggregate was outstanding:
        # holding updates back would only make them staler.
        if len(buffer) < self.config.buffer_size:
            return []
        batch = list(buffer)
        buffer.clear()
        return batch
