"""Errors that mean "the config asks for something that cannot work": train.py prints them in one
line (no traceback) and exits 2, before any model loads."""


class ConfigError(ValueError):
    """A config value that cannot work; the message says what to change."""


class MissingPathError(ConfigError, FileNotFoundError):
    """A configured path (weights folder, data root, metric weights) that does not exist."""


class RefusedOverwrite(ConfigError, FileExistsError):
    """An output folder that holds files this project did not write: it is never replaced."""


def instantiate_checked(config, **kwargs):
    """hydra.utils.instantiate, letting a ConfigError (e.g. missing metric weights) through
    unwrapped, so the entry points print it in one line."""
    import hydra
    from hydra.errors import InstantiationException

    try:
        return hydra.utils.instantiate(config, **kwargs)
    except InstantiationException as error:
        if isinstance(error.__cause__, ConfigError):
            raise error.__cause__ from None
        raise
