"""The one exception type for errors a user can cause; the CLI turns it into a single line."""


class TrainkitError(Exception):
    """A problem the user can fix (bad data, bad flag, bad checkpoint).

    `exit_code` is what the CLI exits with: 2 for bad input, 3 for a numerical fault.
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
