"""User-facing errors: the CLI prints their message as one line and exits non-zero, without a traceback."""


class ImretError(Exception):
    """Bad input from the user (a recipe, a dataset, a path): the message says what and where."""


class RecipeError(ImretError):
    pass


class DataError(ImretError):
    pass


def one_line(exc: ImretError) -> str:
    """The error's message. One raised in a DataLoader worker reaches the main process as torch's "Caught
    DataError in DataLoader worker process N." and the worker's traceback, whose last line holds the message."""
    text = str(exc)
    if text.startswith("Caught ") and "\nOriginal Traceback" in text:
        last = text.rstrip().splitlines()[-1]  # "imret.errors.DataError: <the message>"
        return last.split(": ", 1)[-1]
    return text
