"""pytest set-up for `pytest benchmarks/ --benchmark-only`: collect bench_*.py, add --bench-quick.

The files are named bench_*.py (the project's name stem, docs/design.md section 7) so that CI's
plain `pytest`, which collects tests/ only, never times anything; this hook makes pytest collect
them here.
"""
import pytest


def pytest_addoption(parser):
    parser.addoption("--bench-quick", action="store_true",
                     help="time the small subset of sizes (as python -m benchmarks.run --quick)")


def pytest_collect_file(parent, file_path):
    # A file named on the command line is collected by pytest itself already.
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
