"""The one exception type vbshare raises for bad input.

Every message is a single line that names the problem and says what to change, so a command-line
entry point can print it without a traceback.
"""


class VBShareError(ValueError):
    """Bad input to vbshare: a wrong module name, an unknown method, a shape mismatch, a corrupt file."""
