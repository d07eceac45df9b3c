"""One exception type for every user-facing failure, so the CLI can print it as a single line."""


class EtformerError(Exception):
    """A bad input or a missing resource, with a message meant for the user."""
