"""OpenCV, imported only where a model reproduces the authors' cv2 arithmetic."""
from __future__ import annotations

from typing import Any


def import_cv2(what: str) -> Any:
    """``cv2``, or an ImportError saying what needs it and how to install it."""
    try:
        import cv2
    except ImportError as exc:
        raise ImportError(f"{what} reproduces the authors' OpenCV arithmetic and needs OpenCV: "
                          "pip install opencv-python-headless") from exc
    return cv2
