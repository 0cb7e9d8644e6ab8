"""Failures of a training job that the user can act on."""


class TrainingError(RuntimeError):
    """A failure the user can act on (bad data for this model, say); its message and code are shown as they are."""

    def __init__(self, message: str, *, code: str = "invalid_training_data") -> None:
        super().__init__(message)
        self.code = code
