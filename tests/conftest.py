"""Markers of the suite (tools/run_tests.sh runs every test; markers select subsets).

* ``cuda``: needs a CUDA device (skipped without one); ``tools/gpu_check.sh`` runs exactly these
  (``pytest -m cuda``) on a GPU machine.
* ``slow``: minutes rather than seconds (the shipped configs simulated at full scale); CI runs them.

Measured kernel choices (engine/kernels/autotune.py) go to a temporary directory of the session,
which the worlds and tools it spawns inherit, never to the user's ~/.cache (unless
``MESHTRON_CACHE_DIR`` is set already).
"""
import os
import shutil
import tempfile


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (tools/gpu_check.sh runs these with -m cuda)")
    config.addinivalue_line("markers", "slow: takes minutes (full-scale simulations of the shipped configs)")
    if not os.environ.get("MESHTRON_CACHE_DIR"):
        path = tempfile.mkdtemp(prefix="meshtron-test-cache-")
        os.environ["MESHTRON_CACHE_DIR"] = path
        config.add_cleanup(lambda: shutil.rmtree(path, ignore_errors=True))
