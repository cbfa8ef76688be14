"""strata's on-disk state: layers, images, tags, containers.

This package imports neither `unionfs` nor `runner` (DESIGN.md: the
dependencies run one way, runner -> unionfs -> store).
"""
from .errors import BadArchive, NoSuchContainer, NoSuchImage, StoreError, UnsafeArchive
from .store import ImageInfo, Store, default_root, parse_reference

__all__ = ["BadArchive", "ImageInfo", "NoSuchContainer", "NoSuchImage", "Store", "StoreError",
           "UnsafeArchive", "default_root", "parse_reference"]
