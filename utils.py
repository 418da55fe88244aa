"""Small shared helpers: user-facing errors, seeding, devices, image conversion and result files."""
from __future__ import annotations

import csv
import logging
import os
import random
import tempfile
from typing import Iterable, Sequence

import numpy as np
import torch

LOGGER = logging.getLogger(__name__)

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


class GlassError(Exception):
    """A mistake in the user's input or environment.

    The CLI prints its message on one line (no traceback) and exits with code 2, so the
    message must say what is wrong and how to fix it.
    """
