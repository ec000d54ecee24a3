"""kstory: the Kolors LoRA style-story workflow as one reliable command.

Importing this package installs a lazy import hook that keeps
``import torchvision`` working next to a CPU-only torch (see
:mod:`kstory.torchvision_compat`); it does nothing where torchvision's own
compiled ops load.
"""

import warnings

from kstory.core.torchvision_compat import install_import_hook

__version__ = "0.1.0"

install_import_hook()
# diffsynth depends on the deprecated ``pynvml`` shim; torch warns about it on every import.
warnings.filterwarnings("ignore", message="The pynvml package is deprecated", category=FutureWarning)
