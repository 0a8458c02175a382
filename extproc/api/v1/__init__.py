"""Generated from protos/extproc/api/v1 by `make protos`."""
