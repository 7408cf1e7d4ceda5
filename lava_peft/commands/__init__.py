"""The `lava` subcommands (one module each); :mod:`lava_peft.cli` registers them and parses the command line."""
