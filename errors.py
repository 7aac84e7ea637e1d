"""The one exception type that the command line turns into a one-line message.

Library code raises ``UserError`` (a ``ValueError``) for problems caused by the
user's input: a missing folder, a foreign model file, an unknown architecture.
``main.py`` prints ``error: <message>`` and exits with status 2, no traceback.
Anything else is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """An expected problem with the user's input; its message is one line."""
