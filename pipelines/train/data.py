"""The data seam of the training runtime: where each step's batches come from.

The runner asks a `StepSource` for the next global step's micro-batches of its rank and stores the source's
`state_dict()` in every checkpoint; a resumed run rebuilds the source from that state and must get exactly the
batches an uninterrupted run would have got. Masks and other per-row randomness are keyed by the batch's
`row_keys`, never by the rank or micro-batch index, so a source that keys rows by their global position makes
training independent of the batch layout.
"""

from __future__ import annotations

from typing import Any, Protocol, TypeVar

B_co = TypeVar("B_co", covariant=True)


class StepSource(Protocol[B_co]):
    def next_step(self) -> list[B_co]:
        """This rank's micro-batches for the next global step (collated, on the CPU)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """JSON-able data position after the last step returned by `next_step`."""
        ...

    def close(self) -> None:
        """Stop background readers; safe to call twice."""
        ...
