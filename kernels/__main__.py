"""python -m kernels: the settings read from the environment, each with its variable.

(A module of its own: `python -m kernels.settings` would run settings.py a second time, after the package's
import had loaded it, and Python warns of that.)"""

from kernels.settings import print_settings

print_settings()
