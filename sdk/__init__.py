"""Python client and signing helpers for the marketplace (no Django import)."""
