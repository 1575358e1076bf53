"""LWM's own formats, each fact written once: its vision token layout (layout), its JSONL field-spec
grammar (grammar), its processors (processor), its chat form (chat), and the import and export cores
between its JSONL records and our examples (importer, exporter). See docs/lwm-format.md.

This package's __init__ imports nothing, so the trainer can take the layout constants without the
rest (which reads files through Beam's filesystems).
"""
