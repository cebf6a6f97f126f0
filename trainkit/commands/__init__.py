"""The commands floor: what a user types. `cli.py` (`trainkit ...`) and `flags.py` (flags made
from `TrainConfig`), and a module per other command, each registering itself with `add_command`:
`bench`, `lr_find`, `inference` (eval, predict, export, and `load_run` for Python), `serve` with
its page `serve_page`, `compare` and `tune`. Nothing below imports it.
"""
