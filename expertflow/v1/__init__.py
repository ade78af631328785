"""Generated from proto/expertflow/v1/*.proto by `python -m expertflow.services.protogen`: do not edit.

tests/test_protos.py fails when these files drift from the protos.
"""
