"""The one exception type that the command line turns into a one-line message.

Library code raises ``UserError`` (a ``ValueError``) for problems caused by the
user's input: a missing folder, a foreign model file, an unknown architecture.
``main.py`` prints ``error: <message>`` and exits with its ``exit_code`` (2; 1 for a full
disk), no traceback.
Anything else is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """An expected problem with the user's input; its message is one line."""

    #: The command line's exit status for it.
    exit_code = 2


class DiskFullError(UserError):
    """A write found no space (or quota) left: the machine's problem, not the input's (exit 1).
    The target is left as it was and the temporary file removed (:func:`atomic.atomic_open`)."""

    exit_code = 1
