"""ovd: open-vocabulary zero-shot object detection on torchvision + open_clip."""

from ovd.errors import OvdError

__version__ = "0.1.0"
__all__ = ["OvdError", "__version__"]
