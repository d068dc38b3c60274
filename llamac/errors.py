"""The one exception type that means "the user gave us something we cannot use".

The CLI prints its message as a single line and exits with code 2; any other exception is a failure while running
(exit 1). Every layer (export, compiler, runtime) raises it for bad input, so the message names the real problem.
"""


class InputError(Exception):
    """Bad input: a missing file, a malformed checkpoint, an unknown target. Message is one line for the user."""
