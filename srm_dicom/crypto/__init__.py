"""Encryption of the files the storage element serves (see DESIGN.md, Security model)."""
