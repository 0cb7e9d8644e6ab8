"""Training files: upload, line-by-line validation, listing and deletion."""
