"""reid: distributed camera-tracklet-aware contrastive learning for vehicle re-identification."""

__version__ = "0.1.0"
