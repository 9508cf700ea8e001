"""The pack format: writing packs, reading their records and tar shards, verifying them, the export record."""
