"""The `lava` subcommands (one module each); :mod:`lava_peft.cli` registers them and parses the command line.

* :mod:`.train`, :mod:`.evaluate`, :mod:`.inspect` — the built-in commands;
* :mod:`.user_train` — ``lava train --data PATH`` (your own table or image folder) and
  ``lava train --task causal-lm`` (instruction / chat tuning of a causal LM);
* :mod:`.generate` — ``lava generate``: text from a base model + one or more adapters.

Nothing here imports :mod:`lava_peft.cli`; ``cli.py`` calls in.
"""
