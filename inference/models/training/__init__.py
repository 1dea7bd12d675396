"""Training scripts of the demonstration models shipped in ``inference/models/builtin`` (not used at run time)."""
