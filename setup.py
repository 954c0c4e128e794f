"""Maps the repository's top-level folders into the one ``loraplex`` import namespace.

Why a setup.py: setuptools' ``packages.find`` cannot discover packages whose import name differs from their
folder, and listing every subpackage by hand goes stale. Here ``engine/model`` becomes ``loraplex.engine.model``
for every folder holding an ``__init__.py``; ``loraplex`` itself stays a namespace, so no bare ``engine`` or
``kernels`` module ever lands in a user's environment.
"""

from pathlib import Path

from setuptools import setup

TOP_LEVEL = ("engine", "registry", "kernels", "services")
ROOT = Path(__file__).parent


def _packages() -> list[str]:
    found = []
    for top in TOP_LEVEL:
        for init in sorted((ROOT / top).rglob("__init__.py")):
            rel = init.parent.relative_to(ROOT)
            found.append("loraplex." + ".".join(rel.parts))
    return found


setup(
    packages=_packages(),
    package_dir={f"loraplex.{top}": top for top in TOP_LEVEL},
    package_data={"": ["*.pyi", "py.typed", "*.mako", "*.ini"]},
)
