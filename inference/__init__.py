"""Inference worker: fetches studies from Orthanc, runs models, writes DICOM results back.

Kept import-light: the Orthanc plugin imports ``inference.models.manifest`` (stdlib only).
"""

__version__ = "0.1.0"
