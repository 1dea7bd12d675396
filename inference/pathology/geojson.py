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

import numpy as np

from inference.pathology.store import NucleusStore

__all__ = ["CLASS_COLOURS", "read_geojson_into", "write_geojson"]

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


def _features(path: Path, chunk: int = 1 << 20):
    """The features of a FeatureCollection, decoded one at a time from the (gzip) stream: memory stays at a
    chunk and one feature, whatever the file's size."""
    decoder = json.JSONDecoder()
    opener = gzip.open if Path(path).suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:  # type: ignore[operator]
        buffer = f.read(chunk)
        start = buffer.find("[")
        if start < 0 or '"FeatureCollection"' not in buffer[:start]:
            raise ValueError(f"{Path(path).name} is not a GeoJSON FeatureCollection")
        pos, eof = start + 1, False
        while True:
            while pos < len(buffer) and buffer[pos] in " \n\r\t,":
                pos += 1
            if pos < len(buffer) and buffer[pos] == "]":
                return
            try:
                if pos >= len(buffer):
                    raise json.JSONDecodeError("more", buffer, pos)
                feature, pos = decoder.raw_decode(buffer, pos)
            except json.JSONDecodeError:
                if eof:
                    raise ValueError(f"{Path(path).name} ends inside a feature") from None
                more = f.read(chunk)
                eof = not more
                buffer, pos = buffer[pos:] + more, 0
                continue
            yield feature


def read_geojson_into(store: NucleusStore, path: Path, classes: tuple[str, ...], batch: int = 5000) -> int:
    """Nuclei written by :func:`write_geojson` back into a store (for outputs made after the analysis, e.g.
    bulk annotations on a slide converted to DICOM later). Returns how many."""
    index = {name: i for i, name in enumerate(classes)}
    columns: list[list] = [[], [], [], [], [], []]
    n = 0

    def flush() -> None:
        if columns[0]:
            store.add(*(np.asarray(c) if i < 5 else c for i, c in enumerate(columns)))
            for c in columns:
                c.clear()

    for feature in _features(path):
        ring = np.asarray(feature["geometry"]["coordinates"][0], np.float32)[:-1]  # written closed
        props = feature.get("properties") or {}
        measurements = props.get("measurements") or {}
        centre = ring.mean(axis=0)
        for column, value in zip(columns, (centre[0], centre[1], measurements.get("Nucleus: Area µm^2", 0.0),
                                           index.get((props.get("classification") or {}).get("name"), 0),
                                           measurements.get("Probability", 1.0), ring)):
            column.append(value)
        n += 1
        if len(columns[0]) >= batch:
            flush()
    flush()
    store.commit()
    return n
