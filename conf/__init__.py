"""masksweep's Hydra configs, as the package `masksweep.conf`.

This file makes the directory a regular package, which Hydra's `pkg://masksweep.conf` config source requires
(it looks for an `__init__.py`). See `masksweep.configs` for how the configs get into the package.
"""
