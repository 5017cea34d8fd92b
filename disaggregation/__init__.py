"""llm-d's P/D disaggregation plugins: profile handlers, deciders, header writers, link profiles.

Every module in this package registers its plugins on import.
"""

import importlib
import pkgutil

for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")
