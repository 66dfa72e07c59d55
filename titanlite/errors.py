"""The one exception type for mistakes a user can fix (config, data, checkpoint, hardware)."""


class UserError(Exception):
    """Raised with a single line: what was wrong, where, and what to do about it.

    Entry points catch it, print `error: <message>` and exit with code 2, without a traceback.
    """
