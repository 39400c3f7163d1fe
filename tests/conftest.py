"""Markers of the suite (tools/run_tests.sh runs every test; markers select subsets).

* ``cuda``: needs a CUDA device (skipped without one); ``tools/gpu_check.sh`` runs exactly these
  (``pytest -m cuda``) on a GPU machine.
* ``slow``: minutes rather than seconds (the shipped configs simulated at full scale); CI runs them.
"""


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (tools/gpu_check.sh runs these with -m cuda)")
    config.addinivalue_line("markers", "slow: takes minutes (full-scale simulations of the shipped configs)")
