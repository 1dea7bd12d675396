"""Model registry: manifests (light, stdlib only) and implementations (loaded by the worker)."""
