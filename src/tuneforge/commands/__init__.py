"""Every subcommand of the ``tuneforge`` command, one module each: the only code that parses arguments and prints."""
