"""VisA (Visual Anomaly) as GLASS items, following the official one-class split file.

Layout: ``<source>/split_csv/1cls.csv`` with columns ``object, split, label, image, mask``: ``split`` is
``train`` or ``test``, ``label`` ``normal`` or ``anomaly``, ``image`` and ``mask`` are paths relative to
``<source>`` (``<class>/Data/Images/{Normal,Anomaly}/*.JPG``, ``<class>/Data/Masks/Anomaly/*.png``).
Foreground masks, if used, are ``<source>/fg_mask/<class>/<image file name>``.

As in the reference: items keep the CSV's order, anomalies first (``anomaly`` is ``anomaly`` or
``normal``), no class is enlarged, and masks are binarised after resizing (> 0). VisA masks hold small
integer labels per defect; every non-zero value is a defect (binarised before the resize as well).
Training items are synthesised exactly as for MVTec AD (``datasets/base.py``).
"""
from __future__ import annotations

import csv
import os
from typing import Any, Dict, List, Tuple

from datasets.base import AnomalyDataset, DatasetSplit
from utils import GlassError


VISA_CLASSES = (
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2", "pcb3",
    "pcb4", "pipe_fryum",
)
CLASSNAMES: Dict[str, Tuple[str, ...]] = {"visa": VISA_CLASSES}
SPLIT_FILE = os.path.join("split_csv", "1cls.csv")
SPLIT_COLUMNS = ("object", "split", "label", "image", "mask")
SPLITS = ("train", "test")
LABELS = ("normal", "anomaly")


def read_split(source: str) -> List[Dict[str, str]]:
    """The rows of ``<source>/split_csv/1cls.csv``; GlassError when it is missing, not the VisA split, or has a
    row that is cut short or whose split or label is not one of SPLITS or LABELS."""
    path = os.path.join(source, SPLIT_FILE)
    if not os.path.isfile(path):
        raise GlassError(
            f"{path} is missing: VisA is read through its split file split_csv/1cls.csv (python -m datasets.fetch "
            "visa DEST puts it there)"
        )
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:  # as UTF-8, with or without Excel's BOM
            reader = csv.DictReader(handle)
            numbered_rows = [(reader.line_num, row) for row in reader]
            columns = [c.strip() for c in reader.fieldnames or []]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise GlassError(f"cannot read {path} ({exc}): replace it with the official split file") from None
    missing = [c for c in SPLIT_COLUMNS if c not in columns]
    if missing:
        raise GlassError(
            f"{path} lacks the column(s) {', '.join(missing)}: expected {', '.join(SPLIT_COLUMNS)} (the official "
            "VisA split file)"
        )
    return [_checked_row(path, line, row) for line, row in numbered_rows]


def _checked_row(path: str, line: int, row: Dict[str | None, str | None]) -> Dict[str, str]:
    """A split file row with its fields stripped; GlassError naming its line when it would be left out."""
    row = {key.strip(): value for key, value in row.items() if key is not None}  # None: fields past the header's
    if any(row[column] is None for column in SPLIT_COLUMNS):  # csv gives None for the fields a short row lacks
        given = ",".join(value for value in row.values() if value is not None)
        raise GlassError(f"{path}, line {line}: the row '{given}' is cut short: every row has the columns "
                         f"{', '.join(SPLIT_COLUMNS)} (mask empty for normal images)")
    row = {key: (value or "").strip() for key, value in row.items()}
    for column, allowed in (("split", SPLITS), ("label", LABELS)):
        if row[column] not in allowed:
            raise GlassError(f"{path}, line {line}: {column} is '{row[column]}', not {' or '.join(allowed)}: correct "
                             "the row (the official split file uses only those)")
    return row


class VisADataset(AnomalyDataset):
    """One VisA class as GLASS training or test items (see ``datasets.base``)."""

    NORMAL = "normal"
    ANOMALY = "anomaly"
    BINARIZE_RESIZED_MASK = True
    LAYOUT = "VisA"
    CLASSNAMES = CLASSNAMES

    def __init__(self, source: str, anomaly_source_path: str, dataset_name: str = "visa",
                 classname: str = "candle", **kwargs: Any) -> None:
        super().__init__(source, anomaly_source_path, dataset_name=dataset_name, classname=classname, **kwargs)

    def _collect_items(self) -> List[list]:
        """Rows of the class and split from the split file: anomalies first, each in the file's order."""
        rows = read_split(self.source)
        objects = sorted({row["object"] for row in rows})
        if self.classname not in objects:
            raise GlassError(
                f"class '{self.classname}' not found in {os.path.join(self.source, SPLIT_FILE)}: available classes "
                f"are {', '.join(objects) if objects else '(none)'}"
            )
        split = self.split.value
        labels = [self.NORMAL] if self.split == DatasetSplit.TRAIN else [self.ANOMALY, self.NORMAL]
        items = []
        for label in labels:
            for row in rows:
                if row["object"] != self.classname or row["split"] != split or row["label"] != label:
                    continue
                mask = None
                if label != self.NORMAL and row["mask"]:
                    mask = os.path.join(self.source, row["mask"])
                items.append([self.classname, label, os.path.join(self.source, row["image"]), mask])
        if not items:
            what = "normal training images" if self.split == DatasetSplit.TRAIN else "test images"
            self.layout_problems.add(
                f"class without {what}", f"{self.classname} in {SPLIT_FILE}", plural=f"classes without {what}",
                hint=f"the split file lists no {split} rows for it",
            )
        return items
