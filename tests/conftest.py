"""Shared fixtures: where the real test data lives (../shared/data beside the project)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHARED_DATA = Path(os.environ.get("GLASS_SHARED_DATA", ROOT.parent / "shared" / "data"))
MVTEC3D = SHARED_DATA / "mvtec3d"
MAGNETIC = SHARED_DATA / "magnetic_tile"
DTD = SHARED_DATA / "dtd" / "images"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    assert SHARED_DATA.is_dir(), f"real test data not found at {SHARED_DATA}: put ../shared beside the project"
    return SHARED_DATA


@pytest.fixture(scope="session")
def tire_root(shared_data) -> Path:
    """MVTec-layout root holding the class folder `tire`."""
    return MVTEC3D


@pytest.fixture(scope="session")
def dtd_root(shared_data) -> Path:
    """DTD `images/` folder: `<category>/*.jpg`."""
    return DTD
