from ovd.data.coco import DetectionDataset, load_detection_dataset
from ovd.data.splits import Split, resolve_split

__all__ = ["DetectionDataset", "Split", "load_detection_dataset", "resolve_split"]
