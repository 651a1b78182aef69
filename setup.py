"""Package discovery for setuptools (everything else is in pyproject.toml).

``export/`` and ``runtime/`` are installed as ``edgead.export`` and ``edgead.runtime`` (the design card's
top-level folders with unambiguous import names), so the package list is discovered here rather than
hand-written: a new method folder under ``edgead/methods/`` is packaged without editing anything.
"""

from __future__ import annotations

from setuptools import find_packages, setup

#: import name -> source folder
ROOTS = {"edgead": "edgead", "edgead.export": "export", "edgead.runtime": "runtime"}


def discover_packages() -> tuple[list[str], dict[str, str]]:
    """Every package under the three roots, and the ``package_dir`` mapping that installs them."""
    packages: list[str] = []
    for name, folder in ROOTS.items():
        packages.append(name)
        packages += [f"{name}.{sub}" for sub in find_packages(folder)]
    return sorted(set(packages)), dict(ROOTS)


if __name__ == "__main__":
    packages, package_dir = discover_packages()
    setup(packages=packages, package_dir=package_dir, package_data={"": ["README.md", "*.html"]})
