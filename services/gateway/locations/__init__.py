"""`/api/v1/locations`: homes, floors and rooms."""
