"""Data stages: embedded sample, COCO -> label maps, Parquet shards, tf.data, GX validation."""
