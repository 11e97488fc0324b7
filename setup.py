"""Only what setup.cfg cannot say: the package ``hawq.conf`` is the top-level ``conf/``."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["hawq", "hawq.*"]), "hawq.conf"],
    package_dir={"hawq.conf": "conf"},
)
