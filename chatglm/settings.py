"""The toolkit's settings, read from the environment once (kernels/settings.py holds them: every package reads them
there). `from chatglm.settings import settings`; `settings.cpu_kernels = False`; `with settings.override(...)`."""

from kernels.settings import ENVIRONMENT, Settings, settings

__all__ = ["ENVIRONMENT", "Settings", "settings"]
