"""The one error type users see: a clear, one-line message; the CLI maps it to exit code 2."""

import tvm_ffi


class UserError(Exception):
    """Bad input from the user: says what failed, on which input, and what to do.

    The CLI prints ``error: <message>`` and exits with code 2; Python callers catch it like any
    exception. Everything else that escapes is a bug in tvm-compress.
    """


# Raised inside a pass (Python called back from C++), it must come back out as UserError, not as
# a generic RuntimeError.
tvm_ffi.register_error("UserError", UserError)
