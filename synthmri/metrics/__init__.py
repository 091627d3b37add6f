"""Image-quality and distribution metrics used by validation and the report."""
