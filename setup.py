"""Ships `peft_tglora.pth` into site-packages (see `_peft_tglora_autoload.py`); everything else is in pyproject."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        self.copy_file("peft_tglora.pth", os.path.join(self.build_lib, "peft_tglora.pth"))


setup(cmdclass={"build_py": BuildPyWithPth})
