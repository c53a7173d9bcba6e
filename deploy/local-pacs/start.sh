#!/usr/bin/env bash
# Start a local Orthanc that plays the hospital PACS for dicom-node, in the foreground.
# It knows the node as the modality "dicom-node" (DICOMNODE@127.0.0.1:11112) and accepts the
# node's results on port 4242 (AE ORTHANC); its web interface is http://127.0.0.1:8042/.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if ! command -v Orthanc >/dev/null; then
    echo "installing Orthanc (Debian packages orthanc, orthanc-dicomweb)" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq orthanc orthanc-dicomweb
fi
cd "$here"  # the configuration's relative paths are relative to this folder
mkdir -p ../../var/local-pacs
# Orthanc speaks DICOM through DCMTK, which is slow on loopback without TCP_NODELAY.
exec env TCP_NODELAY=1 Orthanc "$here/orthanc.json"
