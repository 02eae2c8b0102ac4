"""Project errors: user mistakes that the CLI reports in one line and exits 2 for."""


class CosmosTrainError(Exception):
    """A user-facing error (bad input, bad spec, bad checkpoint). The CLI exits 2."""

    exit_code = 2


class SpecError(CosmosTrainError):
    """The experiment spec is invalid; the message has one line per problem."""


class CheckpointError(CosmosTrainError):
    """A checkpoint is missing, partial or corrupt; the message names the file."""


class CorruptCheckpointError(CheckpointError):
    """A committed checkpoint's bytes are damaged (checksum mismatch, unreadable item); the
    message names the file. `checkpoint.fallback_to_previous` applies to it."""
