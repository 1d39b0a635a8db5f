"""Tests of the Knative manifests, the Dockerfiles, and the routing they declare."""
