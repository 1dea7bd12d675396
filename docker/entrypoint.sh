#!/bin/sh
# Generate the effective configuration (ports, credentials, data dir) and run Orthanc in the foreground.
set -e
cd /opt/orthanc-ai
exec .venv/bin/python -m orthanc_plugin.launcher
