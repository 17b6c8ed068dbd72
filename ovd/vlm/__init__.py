from ovd.vlm.clip import ClipModel

__all__ = ["ClipModel"]
