"""The one exception type a user is meant to see: the CLI prints it and exits with code 2."""


class CompressError(Exception):
    """A problem with the user's input (recipe, model, data, checkpoint), stated in one paragraph."""


class NumericError(CompressError):
    """A NaN or infinity appeared where a finite number was required."""
