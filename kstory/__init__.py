"""kstory: the Kolors LoRA style-story workflow as one reliable command.

Importing this package installs a lazy import hook that keeps
``import torchvision`` working next to a CPU-only torch (see
:mod:`kstory.torchvision_compat`); it does nothing where torchvision's own
compiled ops load.
"""

import logging
import warnings

from kstory.core.torchvision_compat import install_import_hook

__version__ = "0.1.0"

install_import_hook()
# diffsynth depends on the deprecated ``pynvml`` shim; torch warns about it on every import.
warnings.filterwarnings("ignore", message="The pynvml package is deprecated", category=FutureWarning)
# torchao (kstory[quant]) is imported by transformers when installed; it logs CUDA-only kernels it cannot load,
# and torch logs its Enum registrations. Neither concerns a kstory run.
logging.getLogger("torchao").setLevel(logging.ERROR)


class _DropEnumRegistrationNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "is an Enum subclass and is now natively supported" not in record.getMessage()


logging.getLogger("torch.utils._pytree").addFilter(_DropEnumRegistrationNotice())
