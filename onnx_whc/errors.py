"""Errors that reach the user as one clear line."""


class OnnxWhcError(Exception):
    """Base class; str(err) is the message shown to the user."""

    exit_code = 2


class UserInputError(OnnxWhcError):
    """Bad input file, option or data: exit code 2."""

    exit_code = 2


class ValidationError(OnnxWhcError):
    """The pruned model failed validation: exit code 1."""

    exit_code = 1


def first_line(err: Exception) -> str:
    """The first line of a library's error (ONNX Runtime's run to pages), or its type's name."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
