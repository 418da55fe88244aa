"""BTAD (beanTech Anomaly Detection) as GLASS items: the MVTec AD loader with ``ok``/``ko`` folders.

Original layout: ``<source>/<class>/train/ok/*``, ``<source>/<class>/test/{ok,ko}/*`` and the masks
``<source>/<class>/ground_truth/ko/<stem>.png`` (or ``.bmp``); images are ``.bmp`` (01, 03) or ``.png``
(02). The MVTec AD layout written by ``python -m datasets.fetch btad`` (``ok`` renamed ``good``, masks
``<stem>_mask.png``) is read as well. ``ok`` images are the normal ones (``anomaly`` ``good``).
"""
from __future__ import annotations

from typing import Dict, Tuple

from datasets.mvtec import MVTecDataset

BTAD_CLASSES = ("01", "02", "03")
CLASSNAMES: Dict[str, Tuple[str, ...]] = {"btad": BTAD_CLASSES}


class BTADDataset(MVTecDataset):
    """A BTAD class, in its original ``ok``/``ko`` layout or converted to the MVTec AD layout."""

    NORMAL_FOLDERS = ("good", "ok")
    LAYOUT = "BTAD"
    CLASSNAMES = CLASSNAMES
