"""Whole-slide pathology: a slide in, QC, nuclei counts, densities, a heatmap and a structured report out.

One small module per step (``reader`` → ``tissue`` → ``tiling`` → ``qc`` → ``nuclei``/``hovernet`` →
``aggregation``/``heatmap`` → ``report``, ``geojson``, ``dicom``), composed by ``pipeline``; ``worker``
speaks the slide-job protocol with the plugin (``orthanc_plugin/slides.py``). Every step streams: no step
holds a full-resolution level of a slide in memory.
"""
