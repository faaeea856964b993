"""The one exception type users see.

Anything the user can fix (a bad config key, a malformed data file, a directory that is not a checkpoint)
raises :class:`UserError` with a message that says what is wrong and where. The command line prints the
message without a traceback and exits with status 2; programming errors keep their tracebacks.
"""


class UserError(Exception):
    """An error caused by input the user controls; the message names the file, line or key to fix."""
