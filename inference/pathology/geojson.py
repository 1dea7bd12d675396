"""Nuclei as GeoJSON that QuPath 0.5/0.6 imports (File → Import objects, or drag and drop).

A ``FeatureCollection`` of ``Feature`` objects with a UUID ``id``, a closed, valid ``Polygon`` in level-0
pixel coordinates (QuPath's convention: origin at the top-left corner of the top-left pixel),
``properties.objectType = "detection"``, ``properties.classification`` {name, color} and
``properties.measurements``. Written feature by feature from the nuclei store into a gzip stream, so a
slide with a million nuclei costs disk, not memory (WSI.md §8: OOM while writing GeoJSON is a known failure).
"""

from __future__ import annotations

import gzip
import json
import uuid
from pathlib import Path

from inference.pathology.store import NucleusStore

__all__ = ["CLASS_COLOURS", "write_geojson"]

CLASS_COLOURS = {
    "Nucleus (unclassified)": (160, 90, 160), "Neoplastic": (220, 40, 40), "Inflammatory": (40, 170, 60),
    "Connective": (40, 90, 220), "Dead": (230, 200, 40), "Epithelial": (240, 130, 30),
    "Other": (150, 150, 150), "Spindle-shaped": (40, 90, 220),
}

_NAMESPACE = uuid.UUID("5b0a43a2-0c3e-5d0e-8f1c-2c6f1a9e8d11")


def write_geojson(store: NucleusStore, path: Path, classes: tuple[str, ...], *, slide_key: str) -> dict:
    """Write ``path`` (gzip when it ends with ``.gz``); feature ids derive from ``slide_key`` (reproducible).

    Returns {"features": n, "bytes": size}.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    n = 0
    with opener(path, "wt", encoding="utf-8") as f:  # type: ignore[operator]
        f.write('{"type":"FeatureCollection","features":[')
        for nucleus in store.iter():
            ring = [[round(float(x), 2), round(float(y), 2)] for x, y in nucleus.polygon]
            ring.append(ring[0])
            name = classes[nucleus.class_index] if nucleus.class_index < len(classes) else classes[0]
            feature = {
                "type": "Feature", "id": str(uuid.uuid5(_NAMESPACE, f"{slide_key}:{nucleus.id}")),
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {"objectType": "detection", "isLocked": False,
                               "classification": {"name": name, "color": list(CLASS_COLOURS.get(name, (128, 128, 128)))},
                               "measurements": {"Nucleus: Area µm^2": round(nucleus.area_um2, 3),
                                                "Probability": round(nucleus.probability, 4)}},
            }
            if n:
                f.write(",")
            f.write(json.dumps(feature, separators=(",", ":"), ensure_ascii=False))
            n += 1
        f.write("]}")
    return {"features": n, "bytes": path.stat().st_size}
