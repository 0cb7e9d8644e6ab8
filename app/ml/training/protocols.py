"""What a training recipe is handed from above and raises back: a reporter, a checkpointer, a stop signal.

The worker implements them over the job's row and the object store; a plain script or a test implements them
in memory. Nothing here knows about jobs, databases or queues.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from app.core.error_codes import ErrorCode

if TYPE_CHECKING:
    from app.ml.device import Placement
    from app.ml.training.recipe import TrainingRecipe


class Reporter(Protocol):
    """Where a recipe reports to. Its calls may raise to stop the recipe (the job was cancelled, say): the
    exception goes through the recipe unchanged."""

    def event(self, type_: str, message: str, data: dict[str, Any] | None = None, level: str = "info") -> None: ...

    def placement(self, placement: Placement) -> None: ...

    def progress(
        self, *, step: int, total_steps: int, epoch: int, metrics: dict[str, Any], message: str, type_: str = "metrics"
    ) -> None: ...

    def check_cancelled(self) -> None: ...


class Checkpointer(Protocol):
    """Where a recipe saves its checkpoints (`recipe.state_dict()`, and `recipe.export` for the artifact)."""

    def save(self, recipe: TrainingRecipe) -> None: ...


# Asked between steps: whether the process wants the run to stop (it is shutting down). The recipe then saves a
# checkpoint and raises StopRequested.
StopSignal = Callable[[], bool]


def never() -> bool:
    return False


class StopRequested(Exception):
    """The run stopped because the stop signal asked it to, with a checkpoint at `step` (if given)."""

    def __init__(self, step: int | None = None) -> None:
        super().__init__(f"stopped at step {step}" if step is not None else "stopped")
        self.step = step


class TrainingError(RuntimeError):
    """A failure the user can act on (bad data for this model, say); its message and code are shown as they are."""

    def __init__(self, message: str, *, code: ErrorCode = ErrorCode.invalid_training_data) -> None:
        super().__init__(message)
        self.code = code
