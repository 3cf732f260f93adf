"""radbridge product core: settings, agreements, database, metrics catalog, CLI.

This package imports nothing else of ours (README, "Layout"); the CLI module is the
composition root and imports the other packages lazily, inside its commands.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
