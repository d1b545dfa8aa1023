"""Feature cache: per-clip Zarr groups plus a Parquet manifest (see feature_store.py)."""

from storage.feature_store import ConfigMismatchError, FeatureStore, StoreError

__all__ = ["ConfigMismatchError", "FeatureStore", "StoreError"]
