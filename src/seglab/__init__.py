"""seglab: transfer learning for semantic segmentation, from COCO to a DuckDB warehouse."""

__version__ = "0.1.0"
