"""Kubernetes operator for SynerDiff: reconciles `DiffusionPool` objects into engine Deployments."""

GROUP = "synerdiff.io"
VERSION = "v1alpha1"
KIND = "DiffusionPool"
PLURAL = "diffusionpools"
SINGULAR = "diffusionpool"
API_VERSION = f"{GROUP}/{VERSION}"
