"""Errors that the command line turns into one clear message and exit status 2 (no traceback)."""


class UserError(Exception):
    """A mistake in the user's input (config, data, paths). The CLI prints it and exits with status 2."""


class DataError(UserError):
    """A bad row or file. The message starts with ``file:line:`` so the user can jump to it."""

    def __init__(self, where: str, message: str):
        self.where = where
        self.detail = message
        super().__init__(f"{where}: {message}" if where else message)


class TrainingError(Exception):
    """A run that cannot go on (e.g. too many non-finite steps in a row). Printed without a traceback, exit 1."""


class Preempted(Exception):
    """A run stopped by SIGTERM or SIGINT after writing a checkpoint at the end of its current step. The CLI prints
    it and exits with status 75 (EX_TEMPFAIL: try again); the same command resumes exactly."""


PREEMPTED_STATUS = 75
