"""Only the C extension lives here; every other setting is in pyproject.toml.

gateway/_heads.c is the data plane's plain-head check (gateway/heads.py explains why it is in C
and falls back to Python when it is not built).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("gateway._heads", ["gateway/_heads.c"], extra_compile_args=["-O2"]),
    ]
)
