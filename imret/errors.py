"""User-facing errors: the CLI prints their message as one line and exits non-zero, without a traceback."""


class ImretError(Exception):
    """Bad input from the user (a recipe, a dataset, a path): the message says what and where."""


class RecipeError(ImretError):
    pass


class DataError(ImretError):
    pass
